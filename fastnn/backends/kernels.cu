// fastnn's CUDA kernels: every kernel the GPU training step launches, in one module.
//
// Loaded by cupy_ops.py as a CuPy RawModule (compiled by NVRTC on first use); the
// tests also compile this file for sm_80/sm_90 with NVRTC, and run it on the CPU
// through a small CUDA emulator (tests/cuda_emulator.py), so every kernel here is
// executed in CI without a GPU. The emulator runs a block's threads in a random order
// between barriers and reports races on __shared__ arrays, reads of unwritten ones and
// launches over the hardware's limits; tests/test_kernel_mutants.py removes each
// __syncthreads() in turn and checks that the emulated tests fail.
//
// Conventions: arrays are row-major and contiguous; T is float or double, and each
// kernel exists as NAME_f32 and NAME_f64 (the extern "C" lines at the end of each
// part). Activation codes (ACT_CODES in cupy_ops.py): 0 linear, 1 relu, 2 sigmoid,
// 3 tanh. Every sum is taken in a fixed order, so two runs of a kernel give the
// same bits, and a captured CUDA graph gives the same bits as eager launches.
//
// A training step is: gather_rows + gather_labels, then per layer linear_act,
// then row_loss, then per layer weight_grad (+ input_grad), then one optimizer
// kernel over the whole parameter arena (and step_count for Adam's and dropout's
// device step counters).
//
// A stack of models (fastnn.stack.ModelStack) runs the same GEMM and loss kernels with
// one more grid axis: model k is blockIdx.z (blockIdx.x for row_loss), and each array
// argument comes with a stride, the elements between two models' parts (0 for an array
// all models share, such as the input batch of a shared batch order). Dropout's
// threshold, scale and seed are arrays read at [k * sdrop] (sdrop 0: one for all).

#define TILE 16  // GEMM tiles are TILE x TILE; GEMM kernels run with TILE x TILE threads

// ------------------------------------------------------------------ activations
template <typename T>
__device__ T activate(T z, int act) {
    switch (act) {
        case 1: return z > (T)0 ? z : (T)0;
        case 2: return (T)0.5 * tanh((T)0.5 * z) + (T)0.5;  // sigmoid; no overflow for any z
        case 3: return tanh(z);
        default: return z;
    }
}

// d * act'(z), written with the activation a = act(z)
template <typename T>
__device__ T act_grad(T d, T a, int act) {
    switch (act) {
        case 1: return a > (T)0 ? d : (T)0;
        case 2: return d * a * ((T)1 - a);
        case 3: return d * ((T)1 - a * a);
        default: return d;
    }
}

// -------------------------------------------------------------------- dropout
// Inverted dropout with masks from a counter-based hash of (seed, step, layer, element):
// no mask is stored, the backward pass recomputes it, the step counter lives on the
// device (a CUDA graph replays it), and NumPy computes the same bits (Ops.dropout_keep).
// An element is kept when the top 24 bits of its hash are >= thr = round(p * 2^24); a
// kept activation is multiplied by scale = 1 / (1 - p). thr = 0 (and scale 1) is no dropout.
__device__ unsigned int mix32(unsigned int x) {  // "lowbias32", a well-tested 32-bit integer hash
    x ^= x >> 16;
    x *= 0x7feb352dU;
    x ^= x >> 15;
    x *= 0x846ca68bU;
    x ^= x >> 16;
    return x;
}

__device__ bool dropout_keep(long long e, int thr, unsigned int seed, int step, int layer) {
    if (thr == 0) return true;
    const unsigned long long u = (unsigned long long)e;
    unsigned int h = mix32((unsigned int)(u & 0xffffffffULL) ^ mix32((unsigned int)(u >> 32)));
    h = mix32(seed ^ mix32((unsigned int)step ^ mix32((unsigned int)layer ^ h)));
    return (int)(h >> 8) >= thr;
}

// ------------------------------------------------------------------------ GEMM
// The row tiles of a GEMM's output (M rows): block y takes the tiles from row0 = blockIdx.y * TILE
// on, every gridDim.y-th. A launch has at most 65535 blocks on grid.y (cupy_ops.MAX_GRID_Y, the limit
// of every GPU), so each block of a larger GEMM (over 1048560 rows) takes several tiles in turn. All
// threads of a block run the same tiles: tile_dot's barriers are reached by all.
#define FOR_ROW_TILES(row0, M) \
    for (long long row0 = (long long)blockIdx.y * TILE; row0 < (M); row0 += (long long)gridDim.y * TILE)

// One thread's element of C = op(A) @ op(B), C (M, N), summed over P in tiles, in the row
// tile from row row0 (FOR_ROW_TILES). op(A)[i][p] is A[i * lda + p], or A[p * lda + i] when
// TA (A stored transposed); rows i >= a_rows of op(A) read as 1 (weight_grad's extra row
// gives the bias gradient). op(B)[p][j] is B[p * ldb + j], or B[j * ldb + p] when TB. Every
// thread of the block must call it (it synchronises); the caller stores C[i][j] for
// i = row0 + threadIdx.y, j = blockIdx.x * TILE + threadIdx.x.
template <typename T, bool TA, bool TB>
__device__ T tile_dot(const T* __restrict__ A, const T* __restrict__ B, int M, int N, int P, int a_rows,
                      int lda, int ldb, long long row0_) {
    __shared__ T As[TILE][TILE + 1];  // As[r][q] = op(A)[row0 + r][p0 + q]
    __shared__ T Bs[TILE][TILE + 1];  // Bs[q][c] = op(B)[p0 + q][col0 + c]
    const int tx = threadIdx.x, ty = threadIdx.y;
    const int row0 = (int)row0_, col0 = blockIdx.x * TILE;
    T acc = 0;
    for (int p0 = 0; p0 < P; p0 += TILE) {
        // loads: consecutive threadIdx.x read consecutive addresses in both layouts
        if (TA) {
            const int i = row0 + tx, p = p0 + ty;
            As[tx][ty] = (p < P && i < M) ? (i < a_rows ? A[(long long)p * lda + i] : (T)1) : (T)0;
        } else {
            const int i = row0 + ty, p = p0 + tx;
            As[ty][tx] = (p < P && i < M) ? (i < a_rows ? A[(long long)i * lda + p] : (T)1) : (T)0;
        }
        if (TB) {
            const int j = col0 + ty, p = p0 + tx;
            Bs[tx][ty] = (p < P && j < N) ? B[(long long)j * ldb + p] : (T)0;
        } else {
            const int p = p0 + ty, j = col0 + tx;
            Bs[ty][tx] = (p < P && j < N) ? B[(long long)p * ldb + j] : (T)0;
        }
        __syncthreads();
        for (int q = 0; q < TILE; ++q) acc += As[ty][q] * Bs[q][tx];
        __syncthreads();
    }
    return acc;
}

// out (M, N) = dropout(act(x (M, K) @ W (K, N) + b (N,))): a layer's forward pass
// (model blockIdx.z of a stack: strides sx, sw (W and b), so between models)
template <typename T>
__device__ void linear_act(const T* x, const T* W, const T* b, T* out, int M, int N, int K, int act, const int* thr,
                           const T* scale, const unsigned int* seed, int sdrop, const int* step, int layer,
                           long long sx, long long sw, long long so) {
    const long long k = blockIdx.z;
    x += k * sx; W += k * sw; b += k * sw; out += k * so;
    FOR_ROW_TILES(row0, M) {
        const T acc = tile_dot<T, false, false>(x, W, M, N, K, M, K, N, row0);
        const long long i = row0 + threadIdx.y;
        const int j = blockIdx.x * TILE + threadIdx.x;
        if (i < M && j < N) {
            const long long e = i * N + j, r = k * sdrop;
            out[e] = dropout_keep(e, thr[r], seed[r], step[0], layer) ? activate(acc + b[j], act) * scale[r] : (T)0;
        }
    }
}

// out (M, K) = (d (M, N) @ W (K, N)^T) * act'(z), the gradient of the layer's input, where
// a (M, K) = dropout(act(z)) is the previous layer's output (its dropout: thr, scale, layer)
// (a stack: strides sd for d and a and out, sw for W)
template <typename T>
__device__ void input_grad(const T* d, const T* W, const T* a, T* out, int M, int N, int K, int act, const int* thr,
                           const T* scale, const unsigned int* seed, int sdrop, const int* step, int layer,
                           long long sd, long long sw, long long sa) {
    const long long k = blockIdx.z;
    d += k * sd; W += k * sw; a += k * sa; out += k * sa;
    FOR_ROW_TILES(row0, M) {
        const T acc = tile_dot<T, false, true>(d, W, M, K, N, M, N, N, row0);
        const long long i = row0 + threadIdx.y;
        const int j = blockIdx.x * TILE + threadIdx.x;
        if (i < M && j < K) {
            const long long e = i * K + j, r = k * sdrop;
            out[e] = dropout_keep(e, thr[r], seed[r], step[0], layer) ? act_grad(acc * scale[r], a[e] / scale[r], act)
                                                                       : (T)0;
        }
    }
}

// gW (K, N) = a (M, K)^T @ d (M, N) and gb (N,) = the column sums of d, as one
// GEMM of K + 1 output rows (row K of op(A) is all ones): grid (ceil(N/TILE), row tiles of K + 1)
// (a stack: strides sa, sd, sg (gW and gb) between models)
template <typename T>
__device__ void weight_grad(const T* a, const T* d, T* gW, T* gb, int M, int K, int N, long long sa, long long sd,
                            long long sg) {
    const long long k = blockIdx.z;
    a += k * sa; d += k * sd; gW += k * sg; gb += k * sg;
    FOR_ROW_TILES(row0, K + 1) {
        const T acc = tile_dot<T, true, false>(a, d, K + 1, N, M, K, K, N, row0);
        const long long i = row0 + threadIdx.y;
        const int j = blockIdx.x * TILE + threadIdx.x;
        if (j < N) {
            if (i < K) gW[i * N + j] = acc;
            else if (i == K) gb[j] = acc;
        }
    }
}

#define LAYER_GEMM_ARGS(T) int M, int N, int K, int act, const int* thr, const T* scale, const unsigned int* seed, \
    int sdrop, const int* step, int layer, long long s1, long long s2, long long s3
#define LAYER_GEMM_PASS M, N, K, act, thr, scale, seed, sdrop, step, layer, s1, s2, s3
extern "C" __global__ void linear_act_f32(const float* x, const float* W, const float* b, float* out,
                                          LAYER_GEMM_ARGS(float)) { linear_act<float>(x, W, b, out, LAYER_GEMM_PASS); }
extern "C" __global__ void linear_act_f64(const double* x, const double* W, const double* b, double* out,
                                          LAYER_GEMM_ARGS(double)) { linear_act<double>(x, W, b, out, LAYER_GEMM_PASS); }
extern "C" __global__ void input_grad_f32(const float* d, const float* W, const float* a, float* out,
                                          LAYER_GEMM_ARGS(float)) { input_grad<float>(d, W, a, out, LAYER_GEMM_PASS); }
extern "C" __global__ void input_grad_f64(const double* d, const double* W, const double* a, double* out,
                                          LAYER_GEMM_ARGS(double)) { input_grad<double>(d, W, a, out, LAYER_GEMM_PASS); }
extern "C" __global__ void weight_grad_f32(const float* a, const float* d, float* gW, float* gb, int M, int K, int N,
                                           long long sa, long long sd, long long sg) {
    weight_grad<float>(a, d, gW, gb, M, K, N, sa, sd, sg);
}
extern "C" __global__ void weight_grad_f64(const double* a, const double* d, double* gW, double* gb, int M, int K,
                                           int N, long long sa, long long sd, long long sg) {
    weight_grad<double>(a, d, gW, gb, M, K, N, sa, sd, sg);
}

// ----------------------------------------------- epilogues for a cuBLAS GEMM
// (CupyOps(gemm="cublas"): cuBLAS computes the products, these add the rest)

// h (B, N) = dropout(act(h + b (N,))), in place
template <typename T>
__device__ void bias_act(T* h, const T* b, long long B, long long N, int act, int thr, T scale, unsigned int seed,
                         const int* step, int layer) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < B * N;
         e += (long long)blockDim.x * gridDim.x)
        h[e] = dropout_keep(e, thr, seed, step[0], layer) ? activate(h[e] + b[e % N], act) * scale : (T)0;
}

// d (n,) *= act'(z), with a = dropout(act(z)), in place
template <typename T>
__device__ void act_backward(T* d, const T* a, long long n, int act, int thr, T scale, unsigned int seed,
                             const int* step, int layer) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < n; e += (long long)blockDim.x * gridDim.x)
        d[e] = dropout_keep(e, thr, seed, step[0], layer) ? act_grad(d[e] * scale, a[e] / scale, act) : (T)0;
}

extern "C" __global__ void bias_act_f32(float* h, const float* b, long long B, long long N, int act, int thr,
                                        float scale, unsigned int seed, const int* step, int layer) {
    bias_act<float>(h, b, B, N, act, thr, scale, seed, step, layer);
}
extern "C" __global__ void bias_act_f64(double* h, const double* b, long long B, long long N, int act, int thr,
                                        double scale, unsigned int seed, const int* step, int layer) {
    bias_act<double>(h, b, B, N, act, thr, scale, seed, step, layer);
}
extern "C" __global__ void act_backward_f32(float* d, const float* a, long long n, int act, int thr, float scale,
                                            unsigned int seed, const int* step, int layer) {
    act_backward<float>(d, a, n, act, thr, scale, seed, step, layer);
}
extern "C" __global__ void act_backward_f64(double* d, const double* a, long long n, int act, int thr, double scale,
                                            unsigned int seed, const int* step, int layer) {
    act_backward<double>(d, a, n, act, thr, scale, seed, step, layer);
}

// ------------------------------------------------------------------- the loss
// One block of ROW_LOSS_THREADS = 256 threads walks the rows (K, the number of
// classes, is small): each row's softmax (or sigmoid MSE), loss, argmax and
// gradient in one pass, then a shared-memory reduction of the loss sum and the
// hit count. z (B, K) logits or sigmoid outputs, y (B,) labels, g (B, K) dL/dz
// of the batch-mean loss (written when want_grad == 1), loss_out / hits_out (1,). With
// weighted, row r's loss and gradient are multiplied by w[r] (the batch loss is
// sum_r w[r] loss_r / B); otherwise w is not read. A stack launches one block per
// model: block k reads z and writes g at k * sz, reads y at k * sy, writes loss_out[k], hits_out[k].
// want_grad == 2 writes the class probabilities into g instead (the softmax, or the sigmoid
// outputs, at least the smallest normal number, scaled to sum to 1), reading no y, w,
// loss_out or hits_out: predict_proba's probabilities are this kernel's softmax.
template <typename T>
__device__ void row_loss(const T* z, const int* y, const T* w, T* g, T* loss_out, int* hits_out, int B, int K,
                         int want_grad, int mse, int weighted, long long sz, long long sy) {
    const long long model = blockIdx.x;
    z += model * sz; g += model * sz; y += model * sy; loss_out += model; hits_out += model;
    __shared__ T s_loss[256];
    __shared__ int s_hits[256];
    T my_loss = 0;
    int my_hits = 0;
    for (int r = threadIdx.x; r < B; r += blockDim.x) {
        const T* zr = z + (long long)r * K;
        T* gr = g + (long long)r * K;
        int best = 0;
        T m = zr[0];
        for (int k = 1; k < K; ++k)
            if (zr[k] > m) { m = zr[k]; best = k; }
        if (want_grad == 2) {  // probabilities
            const T tiny = sizeof(T) == 4 ? (T)1.17549435e-38 : (T)2.2250738585072014e-308;
            T s = 0;
            for (int k = 0; k < K; ++k) s += mse ? (zr[k] > tiny ? zr[k] : tiny) : exp(zr[k] - m);
            for (int k = 0; k < K; ++k) gr[k] = (mse ? (zr[k] > tiny ? zr[k] : tiny) : exp(zr[k] - m)) / s;
            continue;
        }
        const int t = y[r];
        const T wr = weighted ? w[r] : (T)1;
        my_hits += best == t;
        if (mse) {
            T acc = 0;
            for (int k = 0; k < K; ++k) {
                T a = zr[k];
                T d = a - (k == t ? (T)1 : (T)0);
                acc += d * d;
                if (want_grad) gr[k] = wr * ((T)2 * d * a * ((T)1 - a) / (T)(B * K));
            }
            my_loss += wr * (acc / (T)K);
        } else {
            T s = 0;
            for (int k = 0; k < K; ++k) s += exp(zr[k] - m);
            my_loss += wr * (log(s) + m - zr[t]);
            if (want_grad) {
                T inv = (T)1 / (s * (T)B);
                for (int k = 0; k < K; ++k) gr[k] = wr * (exp(zr[k] - m) * inv - (k == t ? (T)1 / (T)B : (T)0));
            }
        }
    }
    s_loss[threadIdx.x] = my_loss;
    s_hits[threadIdx.x] = my_hits;
    __syncthreads();
    for (int w = blockDim.x / 2; w > 0; w /= 2) {
        if (threadIdx.x < w) {
            s_loss[threadIdx.x] += s_loss[threadIdx.x + w];
            s_hits[threadIdx.x] += s_hits[threadIdx.x + w];
        }
        __syncthreads();
    }
    if (threadIdx.x == 0 && want_grad != 2) { loss_out[0] = s_loss[0]; hits_out[0] = s_hits[0]; }
}

extern "C" __global__ void row_loss_f32(const float* z, const int* y, const float* w, float* g, float* l, int* h,
                                        int B, int K, int want_grad, int mse, int weighted, long long sz, long long sy) {
    row_loss<float>(z, y, w, g, l, h, B, K, want_grad, mse, weighted, sz, sy);
}
extern "C" __global__ void row_loss_f64(const double* z, const int* y, const double* w, double* g, double* l, int* h,
                                        int B, int K, int want_grad, int mse, int weighted, long long sz, long long sy) {
    row_loss<double>(z, y, w, g, l, h, B, K, want_grad, mse, weighted, sz, sy);
}

// --------------------------------------------------------------- data access
// The index of row r of a gather of `rows` rows: idx (B,), or for a stack with one batch order
// per model, B rows per model read at k * sidx (model k's part of its (K, n) order, not copied)
__device__ long long batch_index(const long long* idx, long long r, long long B, long long sidx) {
    return idx[(r / B) * sidx + r % B];
}

// out (rows, D) = src[idx] * scale + shift as T; src (N, D) uint8 pixels or T
template <typename U, typename T>
__device__ void gather_rows(const U* src, const long long* idx, long long rows, long long B, long long sidx,
                            long long D, T scale, T shift, T* out) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < rows * D;
         e += (long long)blockDim.x * gridDim.x)
        out[e] = (T)src[batch_index(idx, e / D, B, sidx) * D + e % D] * scale + shift;
}

#define GATHER_ARGS(U, T) const U* src, const long long* idx, long long rows, long long B, long long sidx, \
    long long D, T scale, T shift, T* out
#define GATHER_PASS src, idx, rows, B, sidx, D, scale, shift, out
extern "C" __global__ void gather_rows_u8_f32(GATHER_ARGS(unsigned char, float)) {
    gather_rows<unsigned char, float>(GATHER_PASS);
}
extern "C" __global__ void gather_rows_u8_f64(GATHER_ARGS(unsigned char, double)) {
    gather_rows<unsigned char, double>(GATHER_PASS);
}
extern "C" __global__ void gather_rows_f32(GATHER_ARGS(float, float)) { gather_rows<float, float>(GATHER_PASS); }
extern "C" __global__ void gather_rows_f64(GATHER_ARGS(double, double)) { gather_rows<double, double>(GATHER_PASS); }

// out (rows,) = src[idx]: the batch's labels (idx as in gather_rows)
extern "C" __global__ void gather_labels(const int* src, const long long* idx, long long rows, long long B,
                                         long long sidx, int* out) {
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < rows;
         e += (long long)blockDim.x * gridDim.x)
        out[e] = src[batch_index(idx, e, B, sidx)];
}

// ---------------------------------------------------------------- optimizers
// One launch over the whole parameter arena p (n,), gradients g (n,), state arrays (n,).
#define FOR_EACH(e, n) \
    for (long long e = blockIdx.x * (long long)blockDim.x + threadIdx.x; e < (n); e += (long long)blockDim.x * gridDim.x)

// The update of element e, shared by the one-model kernels and the stack's (which read
// per-model hyperparameters). Adam reads its step count t from the device (this step is
// t[0] + 1; step_count advances it afterwards), so a captured step stays right on replay;
// its bias corrections are computed in double, as NumpyOps does, for every T.
template <typename T>
__device__ void sgd_at(T* p, const T* g, long long e, T lr, T wd) { p[e] -= lr * (g[e] + wd * p[e]); }

// Optimizer state below the smallest normal number in magnitude stored as +0 (Ops.flush_subnormal),
// as on the CPU, where subnormal operands are slow.
template <typename T>
__device__ T flushed(T x) {
    const T tiny = sizeof(T) == 4 ? (T)1.17549435082228751e-38 : (T)2.22507385850720138e-308;
    return x < tiny && x > -tiny ? (T)0 : x;
}

template <typename T>
__device__ void momentum_at(T* p, const T* g, T* v, long long e, T lr, T mu, T wd, int nesterov) {
    const T gg = g[e] + wd * p[e];
    const T ve = flushed(mu * v[e] + gg);
    v[e] = ve;
    p[e] -= lr * (nesterov ? gg + mu * ve : ve);
}

template <typename T>
__device__ void adam_corrections(const int* t, T b1, T b2, T* c1, T* c2) {
    const double step = t[0] + 1.0;
    *c1 = (T)(1.0 - pow((double)b1, step));
    *c2 = (T)(1.0 - pow((double)b2, step));
}

template <typename T>
__device__ void adam_at(T* p, const T* g, T* m, T* v, long long e, T lr, T b1, T b2, T c1, T c2, T eps, T wd) {
    const T ge = g[e];
    const T me = flushed(b1 * m[e] + ((T)1 - b1) * ge), ve = flushed(b2 * v[e] + ((T)1 - b2) * ge * ge);
    m[e] = me;
    v[e] = ve;
    p[e] -= lr * ((me / c1) / (sqrt(ve / c2) + eps) + wd * p[e]);
}

template <typename T>
__device__ void sgd(T* p, const T* g, long long n, T lr, T wd) {
    FOR_EACH(e, n) sgd_at(p, g, e, lr, wd);
}

template <typename T>
__device__ void momentum(T* p, const T* g, T* v, long long n, T lr, T mu, T wd, int nesterov) {
    FOR_EACH(e, n) momentum_at(p, g, v, e, lr, mu, wd, nesterov);
}

template <typename T>
__device__ void adam(T* p, const T* g, T* m, T* v, const int* t, long long n, T lr, T b1, T b2, T eps, T wd) {
    T c1, c2;
    adam_corrections(t, b1, b2, &c1, &c2);
    FOR_EACH(e, n) adam_at(p, g, m, v, e, lr, b1, b2, c1, c2, eps, wd);
}

extern "C" __global__ void sgd_f32(float* p, const float* g, long long n, float lr, float wd) { sgd<float>(p, g, n, lr, wd); }
extern "C" __global__ void sgd_f64(double* p, const double* g, long long n, double lr, double wd) {
    sgd<double>(p, g, n, lr, wd);
}
extern "C" __global__ void momentum_f32(float* p, const float* g, float* v, long long n, float lr, float mu, float wd,
                                        int nesterov) { momentum<float>(p, g, v, n, lr, mu, wd, nesterov); }
extern "C" __global__ void momentum_f64(double* p, const double* g, double* v, long long n, double lr, double mu,
                                        double wd, int nesterov) { momentum<double>(p, g, v, n, lr, mu, wd, nesterov); }
extern "C" __global__ void adam_f32(float* p, const float* g, float* m, float* v, const int* t, long long n, float lr,
                                    float b1, float b2, float eps, float wd) {
    adam<float>(p, g, m, v, t, n, lr, b1, b2, eps, wd);
}
extern "C" __global__ void adam_f64(double* p, const double* g, double* m, double* v, const int* t, long long n,
                                    double lr, double b1, double b2, double eps, double wd) {
    adam<double>(p, g, m, v, t, n, lr, b1, b2, eps, wd);
}
// A stack's (K, P) arena: the same updates with per-model hyperparameters, read at
// [(e / P) * s] from (K,) arrays (s = 1) or from one value for all (s = 0).
#define HYPER(x) x[(e / P) * s_##x]
template <typename T>
__device__ void sgd_stack(T* p, const T* g, long long n, long long P, const T* lr, int s_lr, const T* wd, int s_wd) {
    FOR_EACH(e, n) sgd_at(p, g, e, HYPER(lr), HYPER(wd));
}

template <typename T>
__device__ void momentum_stack(T* p, const T* g, T* v, long long n, long long P, const T* lr, int s_lr, const T* mu,
                               int s_mu, const T* wd, int s_wd, int nesterov) {
    FOR_EACH(e, n) momentum_at(p, g, v, e, HYPER(lr), HYPER(mu), HYPER(wd), nesterov);
}

template <typename T>
__device__ void adam_stack(T* p, const T* g, T* m, T* v, const int* t, long long n, long long P, const T* lr, int s_lr,
                           T b1, T b2, T eps, const T* wd, int s_wd) {
    T c1, c2;
    adam_corrections(t, b1, b2, &c1, &c2);
    FOR_EACH(e, n) adam_at(p, g, m, v, e, HYPER(lr), b1, b2, c1, c2, eps, HYPER(wd));
}

extern "C" __global__ void sgd_stack_f32(float* p, const float* g, long long n, long long P, const float* lr, int s_lr,
                                         const float* wd, int s_wd) { sgd_stack<float>(p, g, n, P, lr, s_lr, wd, s_wd); }
extern "C" __global__ void sgd_stack_f64(double* p, const double* g, long long n, long long P, const double* lr,
                                         int s_lr, const double* wd, int s_wd) {
    sgd_stack<double>(p, g, n, P, lr, s_lr, wd, s_wd);
}
extern "C" __global__ void momentum_stack_f32(float* p, const float* g, float* v, long long n, long long P,
                                              const float* lr, int s_lr, const float* mu, int s_mu, const float* wd,
                                              int s_wd, int nesterov) {
    momentum_stack<float>(p, g, v, n, P, lr, s_lr, mu, s_mu, wd, s_wd, nesterov);
}
extern "C" __global__ void momentum_stack_f64(double* p, const double* g, double* v, long long n, long long P,
                                              const double* lr, int s_lr, const double* mu, int s_mu,
                                              const double* wd, int s_wd, int nesterov) {
    momentum_stack<double>(p, g, v, n, P, lr, s_lr, mu, s_mu, wd, s_wd, nesterov);
}
extern "C" __global__ void adam_stack_f32(float* p, const float* g, float* m, float* v, const int* t, long long n,
                                          long long P, const float* lr, int s_lr, float b1, float b2, float eps,
                                          const float* wd, int s_wd) {
    adam_stack<float>(p, g, m, v, t, n, P, lr, s_lr, b1, b2, eps, wd, s_wd);
}
extern "C" __global__ void adam_stack_f64(double* p, const double* g, double* m, double* v, const int* t, long long n,
                                          long long P, const double* lr, int s_lr, double b1, double b2, double eps,
                                          const double* wd, int s_wd) {
    adam_stack<double>(p, g, m, v, t, n, P, lr, s_lr, b1, b2, eps, wd, s_wd);
}

// t (1,) += 1, after the Adam kernel has read it (one thread)
extern "C" __global__ void step_count(int* t) {
    if (blockIdx.x == 0 && threadIdx.x == 0) t[0] += 1;
}

// --------------------------------------------------------- CUDA-graph helpers
// idx (B,) = perm[counter * B : counter * B + B]: the batch of step `counter` of the epoch;
// for a stack with one order per model, perm (K, n) and idx (K, B): every model's row (total = K * B)
extern "C" __global__ void stage(const long long* perm, const int* counter, int B, long long n, int total,
                                 long long* idx) {
    const int e = blockIdx.x * blockDim.x + threadIdx.x;
    if (e < total) idx[e] = perm[(long long)(e / B) * n + (long long)counter[0] * B + e % B];
}

// losses[counter] = loss, hits[counter] = hit, counter += 1 (one thread); a stack's K models
// each file theirs: losses[counter * K + k] = loss[k]
template <typename T>
__device__ void record(const T* loss, const int* hit, int* counter, int K, T* losses, int* hits) {
    const int c = counter[0];
    for (int k = 0; k < K; ++k) {
        losses[(long long)c * K + k] = loss[k];
        hits[(long long)c * K + k] = hit[k];
    }
    counter[0] = c + 1;
}

extern "C" __global__ void record_f32(const float* l, const int* h, int* c, int K, float* ls, int* hs) {
    record<float>(l, h, c, K, ls, hs);
}
extern "C" __global__ void record_f64(const double* l, const int* h, int* c, int K, double* ls, int* hs) {
    record<double>(l, h, c, K, ls, hs);
}
