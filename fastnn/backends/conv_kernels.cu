// fastnn's CUDA kernels for convolutional nets: implicit-GEMM convolutions, max pooling and the
// random translation of a batch of images (the conv nets' augmentation).
//
// Compiled together with kernels.cu, after it, as one module (cupy_ops.source()): TILE,
// FOR_ROW_TILES, FOR_EACH, activate and mix32 come from there, and the conventions are its own
// (NAME_f32 / NAME_f64, activation codes, every sum in a fixed order). Images are NHWC:
// x (B, H, W, C); a convolution's weight is (k*k*C, N), rows in (ki, kj, c) order; stride 1,
// `pad` zeros around; outputs (B, Ho, Wo, N) with Ho = H + 2 pad - k + 1.
//
// The convolutions are GEMMs whose operands are never materialized: the patch matrix
// (B*Ho*Wo, k*k*C) and the input gradient's gather are read from x and d by index as each
// TILE x TILE tile is loaded into shared memory (the loaders below), then summed as the
// dense GEMMs sum (tile_gemm). Each output element is one thread's sum over the reduction
// axis in one fixed order, whatever the batch holds: so conv_act's rows are independent of
// their batch (what Ops.conv_act's rowwise asks) and a captured step gives the same bits.

// A convolution's sizes: input (B, H, W, C), output (B, Ho, Wo, N), k x k kernel, pad zeros
struct ConvShape {
    int B, H, W, C, Ho, Wo, N, k, pad;
};
#define CONV_ARGS int B, int H, int W, int C, int Ho, int Wo, int N, int k, int pad
#define CONV_SHAPE ConvShape{B, H, W, C, Ho, Wo, N, k, pad}

// One thread's element of op(A) @ op(B), summed over [p_begin, p_end) in tiles; la(i, p, p_end) is
// op(A)[i][p] and lb(p, j, p_end) is op(B)[p][j], each 0 out of bounds. The output tile is rows from
// row0, columns from col0; thread (x, y) computes [row0 + y][col0 + x]. TA: op(A) is loaded with
// consecutive threadIdx.x along i (as kernels.cu's tile_dot for a transposed A). Every thread of the
// block must call it (it synchronises).
template <typename T, bool TA, typename LA, typename LB>
__device__ T tile_gemm(const LA& la, const LB& lb, long long row0, int col0, long long p_begin, long long p_end) {
    __shared__ T Ac[TILE][TILE + 1];  // Ac[r][q] = op(A)[row0 + r][p0 + q]
    __shared__ T Bc[TILE][TILE + 1];  // Bc[q][c] = op(B)[p0 + q][col0 + c]
    const int tx = threadIdx.x, ty = threadIdx.y;
    T acc = 0;
    for (long long p0 = p_begin; p0 < p_end; p0 += TILE) {
        if (TA) Ac[tx][ty] = la(row0 + tx, p0 + ty, p_end);
        else Ac[ty][tx] = la(row0 + ty, p0 + tx, p_end);
        Bc[ty][tx] = lb(p0 + ty, col0 + tx, p_end);
        __syncthreads();
        for (int q = 0; q < TILE; ++q) acc += Ac[ty][q] * Bc[q][tx];
        __syncthreads();
    }
    return acc;
}

// element (m, p) of the patch matrix of x: m = (n, oy, ox), p = (ki, kj, c); 0 in the padding
template <typename T>
__device__ T patch(const T* x, const ConvShape& s, long long m, int p) {
    const int c = p % s.C, kk = p / s.C, ox = (int)(m % s.Wo);
    const long long t = m / s.Wo, n = t / s.Ho;
    const int y = (int)(t % s.Ho) + kk / s.k - s.pad, xx = ox + kk % s.k - s.pad;
    return (y >= 0 && y < s.H && xx >= 0 && xx < s.W) ? x[((n * s.H + y) * s.W + xx) * s.C + c] : (T)0;
}

// op(A) of conv_act: the patch matrix (rows B*Ho*Wo, columns k*k*C)
template <typename T>
struct Patches {
    const T* x;
    ConvShape s;
    long long rows;
    __device__ T operator()(long long m, long long p, long long p_end) const {
        return (m < rows && p < p_end) ? patch(x, s, m, (int)p) : (T)0;
    }
};

// op(A) of conv_weight_grad: the patch matrix transposed (rows k*k*C), and a last row of ones
// (the bias gradient), read at [r][m] for r <= P
template <typename T>
struct PatchesT {
    const T* x;
    ConvShape s;
    int P;
    __device__ T operator()(long long r, long long m, long long m_end) const {
        if (m >= m_end || r > P) return (T)0;
        return r < P ? patch(x, s, m, (int)r) : (T)1;
    }
};

// a row-major matrix with `cols` columns, read at [r][c] for r < r_end
template <typename T>
struct Matrix {
    const T* a;
    int cols;
    __device__ T operator()(long long r, long long c, long long r_end) const {
        return (r < r_end && c < cols) ? a[r * cols + c] : (T)0;
    }
};

// op(A) of conv_input_grad: [i][q] with i = (n, y, x) an input position and q = (ki, kj, o): the
// output gradient d[n, y + pad - ki, x + pad - kj, o] that the weight at (ki, kj) carried there
template <typename T>
struct OutGrad {
    const T* d;
    ConvShape s;
    long long rows;
    __device__ T operator()(long long i, long long q, long long q_end) const {
        if (i >= rows || q >= q_end) return (T)0;
        const int o = (int)(q % s.N), kk = (int)(q / s.N), xx = (int)(i % s.W);
        const long long t = i / s.W, n = t / s.H;
        const int oy = (int)(t % s.H) + s.pad - kk / s.k, ox = xx + s.pad - kk % s.k;
        return (oy >= 0 && oy < s.Ho && ox >= 0 && ox < s.Wo) ? d[((n * s.Ho + oy) * s.Wo + ox) * s.N + o] : (T)0;
    }
};

// op(B) of conv_input_grad: [q][c] = W[(ki, kj, c)][o] for q = (ki, kj, o)
template <typename T>
struct WeightT {
    const T* w;
    ConvShape s;
    __device__ T operator()(long long q, long long c, long long q_end) const {
        return (q < q_end && c < s.C) ? w[((q / s.N) * s.C + c) * s.N + q % s.N] : (T)0;
    }
};

// out (B, Ho, Wo, N) = act(patches(x) @ W + b): grid (ceil(N/TILE), row tiles of B*Ho*Wo)
template <typename T>
__device__ void conv_act(const T* x, const T* W, const T* b, T* out, ConvShape s, int act) {
    const long long M = (long long)s.B * s.Ho * s.Wo;
    const int col0 = blockIdx.x * TILE, j = col0 + threadIdx.x;
    FOR_ROW_TILES(row0, M) {
        const T acc = tile_gemm<T, false>(Patches<T>{x, s, M}, Matrix<T>{W, s.N}, row0, col0, 0,
                                          (long long)s.k * s.k * s.C);
        const long long i = row0 + threadIdx.y;
        if (i < M && j < s.N) out[i * s.N + j] = activate(acc + b[j], act);
    }
}

// gW (k*k*C, N) = patches(x)^T @ d and gb (N,) = the column sums of d (B*Ho*Wo, N), as one GEMM of
// P + 1 output rows (the last of op(A) all ones). Split over the summed rows: block z sums rows
// [z * chunk, (z + 1) * chunk); with one block on z it writes gW and gb, else its partial sums into
// part (gridDim.z, P + 1, N), which conv_grad_sum adds in order of z.
template <typename T>
__device__ void conv_weight_grad(const T* x, const T* d, T* gW, T* gb, T* part, ConvShape s, long long chunk) {
    const long long M = (long long)s.B * s.Ho * s.Wo, m0 = blockIdx.z * chunk;
    const long long m1 = m0 + chunk < M ? m0 + chunk : M;
    const int P = s.k * s.k * s.C, col0 = blockIdx.x * TILE, j = col0 + threadIdx.x;
    FOR_ROW_TILES(row0, P + 1) {
        const T acc = tile_gemm<T, true>(PatchesT<T>{x, s, P}, Matrix<T>{d, s.N}, row0, col0, m0, m1);
        const long long i = row0 + threadIdx.y;
        if (i <= P && j < s.N) {
            if (gridDim.z > 1) part[(blockIdx.z * (P + 1LL) + i) * s.N + j] = acc;
            else if (i < P) gW[i * s.N + j] = acc;
            else gb[j] = acc;
        }
    }
}

// gW (P, N) and gb (N,) = the sums over z of part (S, P + 1, N), in order of z
template <typename T>
__device__ void conv_grad_sum(const T* part, int S, long long PN, long long n, T* gW, T* gb) {
    FOR_EACH(e, n) {
        T acc = 0;
        for (int z = 0; z < S; ++z) acc += part[z * n + e];
        if (e < PN) gW[e] = acc;
        else gb[e - PN] = acc;
    }
}

// out (B, H, W, C) = dL/dx from d (B, Ho, Wo, N), a transposed convolution: the GEMM of the
// (B*H*W, k*k*N) matrix gathered from d (OutGrad) by the (k*k*N, C) weight (WeightT), no dcols in
// memory; grid (ceil(C/TILE), row tiles of B*H*W); no activation (the model's act_backward follows)
template <typename T>
__device__ void conv_input_grad(const T* d, const T* W, T* out, ConvShape s) {
    const long long M = (long long)s.B * s.H * s.W;
    const int col0 = blockIdx.x * TILE, j = col0 + threadIdx.x;
    FOR_ROW_TILES(row0, M) {
        const T acc = tile_gemm<T, false>(OutGrad<T>{d, s, M}, WeightT<T>{W, s}, row0, col0, 0,
                                          (long long)s.k * s.k * s.N);
        const long long i = row0 + threadIdx.y;
        if (i < M && j < s.C) out[i * s.C + j] = acc;
    }
}

extern "C" __global__ void conv_act_f32(const float* x, const float* w, const float* b, float* out, CONV_ARGS, int act) {
    conv_act<float>(x, w, b, out, CONV_SHAPE, act);
}
extern "C" __global__ void conv_weight_grad_f32(const float* x, const float* d, float* gW, float* gb, float* part, CONV_ARGS,
                                              long long chunk) {
    conv_weight_grad<float>(x, d, gW, gb, part, CONV_SHAPE, chunk);
}
extern "C" __global__ void conv_grad_sum_f32(const float* part, int S, long long PN, long long n, float* gW, float* gb) {
    conv_grad_sum<float>(part, S, PN, n, gW, gb);
}
extern "C" __global__ void conv_input_grad_f32(const float* d, const float* w, float* out, CONV_ARGS) {
    conv_input_grad<float>(d, w, out, CONV_SHAPE);
}
extern "C" __global__ void conv_act_f64(const double* x, const double* w, const double* b, double* out, CONV_ARGS, int act) {
    conv_act<double>(x, w, b, out, CONV_SHAPE, act);
}
extern "C" __global__ void conv_weight_grad_f64(const double* x, const double* d, double* gW, double* gb, double* part, CONV_ARGS,
                                              long long chunk) {
    conv_weight_grad<double>(x, d, gW, gb, part, CONV_SHAPE, chunk);
}
extern "C" __global__ void conv_grad_sum_f64(const double* part, int S, long long PN, long long n, double* gW, double* gb) {
    conv_grad_sum<double>(part, S, PN, n, gW, gb);
}
extern "C" __global__ void conv_input_grad_f64(const double* d, const double* w, double* out, CONV_ARGS) {
    conv_input_grad<double>(d, w, out, CONV_SHAPE);
}

// ------------------------------------------------------------------ pooling
#define POOL_ARGS int B, int H, int W, int C, int p, int Ho, int Wo  // x or dL/dx (B, H, W, C), p x p windows
#define POOL_PASS B, H, W, C, p, Ho, Wo
// out (B, Ho, Wo, C) = the max of each p x p window of x (B, H, W, C), Ho = H / p (floor); arg: the
// window position (row-major) of the first maximum. A NaN in a window makes the max NaN and stops
// arg where it was, as Ops.maxpool's strict greater-than and propagating maximum do.
template <typename T>
__device__ void maxpool(const T* x, T* out, signed char* arg, POOL_ARGS) {
    FOR_EACH(e, (long long)B * Ho * Wo * C) {
        const int c = (int)(e % C);
        long long t = e / C;
        const int ox = (int)(t % Wo);
        t /= Wo;
        const T* w = x + (((t / Ho) * H + (t % Ho) * p) * W + (long long)ox * p) * C + c;
        T m = w[0];
        int best = 0;
        for (int q = 1; q < p * p; ++q) {
            const T v = w[((long long)(q / p) * W + q % p) * C];
            if (v > m) best = q;
            if (v > m || v != v) m = v;
        }
        out[e] = m;
        arg[e] = (signed char)best;
    }
}

// out (B, H, W, C) = d (B, Ho, Wo, C) at each window's max (arg), 0 elsewhere and where no window read
// (d times 0 or 1, as Ops.maxpool_backward multiplies)
template <typename T>
__device__ void maxpool_backward(const T* d, const signed char* arg, T* out, POOL_ARGS) {
    FOR_EACH(e, (long long)B * H * W * C) {
        const int c = (int)(e % C);
        long long t = e / C;
        const int xx = (int)(t % W);
        t /= W;
        const int y = (int)(t % H);
        T g = 0;
        if (y < Ho * p && xx < Wo * p) {
            const long long o = (((t / H) * Ho + y / p) * Wo + xx / p) * C + c;
            g = d[o] * (T)(arg[o] == (y % p) * p + xx % p);
        }
        out[e] = g;
    }
}

// ---------------------------------------------------------------- translation
// out (B, H, W, C) = image n of x moved by (dy, dx) in [-limit, limit]^2, fill where the pixel came
// from outside: h = mix32(seed ^ mix32(step ^ mix32(n ^ 0x9E3779B9))), dy = h % (2 limit + 1) - limit,
// dx = h / (2 limit + 1) % (2 limit + 1) - limit; step read from the device counter (Ops.translate)
template <typename T>
__device__ void translate(const T* x, T* out, int B, int H, int W, int C, int limit, unsigned int seed,
                          const int* step, T fill) {
    const unsigned int n = 2u * (unsigned int)limit + 1u, st = (unsigned int)step[0];
    FOR_EACH(e, (long long)B * H * W * C) {
        long long t = e / C;
        const int xx = (int)(t % W);
        t /= W;
        const int y = (int)(t % H);
        const long long b = t / H;
        const unsigned int h = mix32(seed ^ mix32(st ^ mix32((unsigned int)b ^ 0x9E3779B9u)));
        const int sy = y - ((int)(h % n) - limit), sx = xx - ((int)(h / n % n) - limit);
        out[e] = (sy >= 0 && sy < H && sx >= 0 && sx < W) ? x[((b * H + sy) * W + sx) * C + e % C] : fill;
    }
}

extern "C" __global__ void maxpool_f32(const float* x, float* out, signed char* arg, POOL_ARGS) {
    maxpool<float>(x, out, arg, POOL_PASS);
}
extern "C" __global__ void maxpool_f64(const double* x, double* out, signed char* arg, POOL_ARGS) {
    maxpool<double>(x, out, arg, POOL_PASS);
}
extern "C" __global__ void maxpool_backward_f32(const float* d, const signed char* arg, float* out, POOL_ARGS) {
    maxpool_backward<float>(d, arg, out, POOL_PASS);
}
extern "C" __global__ void maxpool_backward_f64(const double* d, const signed char* arg, double* out, POOL_ARGS) {
    maxpool_backward<double>(d, arg, out, POOL_PASS);
}
extern "C" __global__ void translate_f32(const float* x, float* out, int B, int H, int W, int C, int limit,
                                       unsigned int seed, const int* step, float fill) {
    translate<float>(x, out, B, H, W, C, limit, seed, step, fill);
}
extern "C" __global__ void translate_f64(const double* x, double* out, int B, int H, int W, int C, int limit,
                                       unsigned int seed, const int* step, double fill) {
    translate<double>(x, out, B, H, W, C, limit, seed, step, fill);
}
