"""Convolution and max pooling as minibatch matrix ops (NHWC): the generic oracle against the
definition and float64 central differences, NumPy's strided im2col against the oracle, and PyTorch
as an optional oracle."""

import numpy as np
import pytest

from fastnn.backends import NumpyOps, Ops

GENERIC = Ops(np)
CASES = [  # (B, H, W, C_in, C_out, k, pad): odd sizes, valid and same padding, one channel and several
    (2, 7, 6, 3, 4, 3, 0),
    (2, 7, 9, 2, 3, 5, 2),
    (1, 5, 5, 1, 2, 3, 1),
    (3, 8, 8, 4, 5, 1, 0),
]


def conv_by_definition(x, W, b, k, pad):
    """out[n, y, x, o] = b[o] + sum_{i, j, c} xpad[n, y + i, x + j, c] * W[(i, j, c), o], by loops."""
    B, H, Wd, C = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    Ho, Wo = H + 2 * pad - k + 1, Wd + 2 * pad - k + 1
    Wk = W.reshape(k, k, C, -1)
    out = np.zeros((B, Ho, Wo, W.shape[1]))
    for y in range(Ho):
        for xx in range(Wo):
            out[:, y, xx] = np.einsum("nijc,ijco->no", xp[:, y:y + k, xx:xx + k], Wk) + b
    return out


def conv(ops, x, W, b, k, pad, act="linear"):
    B, H, Wd, C = x.shape
    Ho, Wo = H + 2 * pad - k + 1, Wd + 2 * pad - k + 1
    cols = np.empty((B, Ho, Wo, k, k, C), x.dtype)
    out = np.empty((B, Ho, Wo, W.shape[1]), x.dtype)
    ops.conv_act(x, W, b, cols, out, act, pad)
    return out, cols


def random_case(case, dtype=np.float64, seed=0):
    B, H, Wd, C, Co, k, pad = case
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((B, H, Wd, C)).astype(dtype), rng.standard_normal((k * k * C, Co)).astype(dtype),
            rng.standard_normal(Co).astype(dtype))


@pytest.mark.parametrize("case", CASES)
def test_convolution_is_the_definition(case):
    x, W, b = random_case(case)
    k, pad = case[5], case[6]
    out, _ = conv(GENERIC, x, W, b, k, pad)
    np.testing.assert_allclose(out, conv_by_definition(x, W, b, k, pad), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_im2col_equals_the_generic_one_bit_for_bit(case, dtype):
    x, W, b = random_case(case, dtype)
    k, pad = case[5], case[6]
    ref, ref_cols = conv(GENERIC, x, W, b, k, pad, "relu")
    numpy_ops = NumpyOps()
    fast, fast_cols = conv(numpy_ops, x, W, b, k, pad, "relu")
    np.testing.assert_array_equal(numpy_ops.patch_matrix(fast_cols), GENERIC.patch_matrix(ref_cols))
    np.testing.assert_array_equal(fast, ref)


def central_difference(f, a, eps=1e-6):
    g = np.zeros_like(a)
    for i in np.ndindex(a.shape):
        old = a[i]
        a[i] = old + eps
        hi = f()
        a[i] = old - eps
        lo = f()
        a[i] = old
        g[i] = (hi - lo) / (2 * eps)
    return g


@pytest.mark.parametrize("case", CASES)
def test_convolution_gradients_match_float64_central_differences(case):
    x, W, b = random_case(case)
    k, pad = case[5], case[6]
    r = np.random.default_rng(1).standard_normal(conv(GENERIC, x, W, b, k, pad)[0].shape)

    def loss():  # L = sum(r * conv(x)): dL/dout = r
        return float((conv(GENERIC, x, W, b, k, pad)[0] * r).sum())

    _, cols = conv(GENERIC, x, W, b, k, pad)
    gW, gb, gx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    GENERIC.conv_param_grads(x, cols, r, gW, gb, pad)
    GENERIC.conv_input_grad(r, W, np.empty_like(cols), gx, pad)
    for analytic, param in ((gW, W), (gb, b), (gx, x)):
        np.testing.assert_allclose(analytic, central_difference(loss, param), rtol=1e-7, atol=1e-8)


def pool(ops, x, p):
    B, H, Wd, C = x.shape
    out = np.empty((B, H // p, Wd // p, C), x.dtype)
    arg = np.empty(out.shape, np.int8)
    ops.maxpool(x, p, out, arg)
    return out, arg


@pytest.mark.parametrize("shape,p", [((2, 6, 6, 3), 2), ((2, 7, 9, 2), 2), ((1, 9, 7, 4), 3)])
def test_max_pooling_forward_and_gradient(shape, p):
    x = np.random.default_rng(2).standard_normal(shape)  # no ties: the max is unique
    out, arg = pool(GENERIC, x, p)
    B, H, W, C = shape
    ref = x[:, :H // p * p, :W // p * p].reshape(B, H // p, p, W // p, p, C).max(axis=(2, 4))
    np.testing.assert_array_equal(out, ref)
    r = np.random.default_rng(3).standard_normal(out.shape)
    gx = np.empty_like(x)
    GENERIC.maxpool_backward(r, arg, p, gx)
    np.testing.assert_allclose(gx, central_difference(lambda: float((pool(GENERIC, x, p)[0] * r).sum()), x),
                               rtol=1e-7, atol=1e-8)
    if H % p:
        assert not gx[:, H // p * p:].any()  # rows no window reads get no gradient


def test_pooling_ties_send_the_gradient_to_the_first_maximum():
    x = np.zeros((1, 4, 4, 1))
    x[0, 2:, 2:, 0] = [[5, 5], [1, 5]]  # a tie of three in the last window
    out, arg = pool(GENERIC, x, 2)
    gx = np.empty_like(x)
    GENERIC.maxpool_backward(np.ones_like(out), arg, 2, gx)
    assert gx[0, :, :, 0].tolist() == [[1, 0, 1, 0], [0, 0, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]]  # all-zero windows too


@pytest.mark.parametrize("case", CASES[:3])
@pytest.mark.parametrize("dtype,tol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_convolution_and_pooling_match_pytorch(case, dtype, tol, torch):
    x, W, b = random_case(case, dtype)
    k, pad = case[5], case[6]
    ops = NumpyOps()
    out, cols = conv(ops, x, W, b, k, pad)
    tx = torch.tensor(x.transpose(0, 3, 1, 2).copy(), requires_grad=True)  # NCHW
    tW = torch.tensor(W.reshape(k, k, x.shape[3], -1).transpose(3, 2, 0, 1).copy(), requires_grad=True)
    tb = torch.tensor(b, requires_grad=True)
    ty = torch.nn.functional.conv2d(tx, tW, tb, padding=pad)
    np.testing.assert_allclose(out, ty.detach().numpy().transpose(0, 2, 3, 1), rtol=tol, atol=tol)
    r = np.random.default_rng(4).standard_normal(out.shape).astype(dtype)
    (ty * torch.tensor(r.transpose(0, 3, 1, 2).copy())).sum().backward()
    gW, gb, gx = np.empty_like(W), np.empty_like(b), np.empty_like(x)
    ops.conv_param_grads(x, cols, r, gW, gb, pad)
    ops.conv_input_grad(r, W, np.empty_like(cols), gx, pad)
    np.testing.assert_allclose(gx, tx.grad.numpy().transpose(0, 2, 3, 1), rtol=tol, atol=tol)
    np.testing.assert_allclose(gW, tW.grad.numpy().transpose(2, 3, 1, 0).reshape(W.shape), rtol=tol, atol=tol)
    np.testing.assert_allclose(gb, tb.grad.numpy(), rtol=tol, atol=tol)
    pooled, _ = pool(ops, out, 2)
    tp = torch.nn.functional.max_pool2d(torch.tensor(out.transpose(0, 3, 1, 2).copy()), 2)
    np.testing.assert_array_equal(pooled, tp.numpy().transpose(0, 2, 3, 1))


@pytest.fixture(params=["compiled", "numpy"])
def fast_path(request, monkeypatch):
    """NumpyOps on each of its paths: cpu_fused's compiled loops (Numba) and the NumPy sequences."""
    from fastnn.backends import cpu_fused

    if request.param == "compiled" and cpu_fused.compiled() is None:
        pytest.skip("Numba is not installed (the fast extra): the NumPy sequences are the only path")
    if request.param == "numpy":
        monkeypatch.setattr(cpu_fused, "_compiled", [None])
    return NumpyOps()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_numpy_conv_kernel_equals_the_generic_one_bit_for_bit(case, dtype, fast_path):
    x, W, b = random_case(case, dtype)
    k, pad = case[5], case[6]
    ref, ref_cols = conv(GENERIC, x, W, b, k, pad, "relu")
    out, cols = conv(fast_path, x, W, b, k, pad, "relu")
    np.testing.assert_array_equal(fast_path.patch_matrix(cols), GENERIC.patch_matrix(ref_cols))
    np.testing.assert_array_equal(out, ref)
    d = np.random.default_rng(5).standard_normal(out.shape).astype(dtype)
    grads = []
    for ops, patches in ((GENERIC, ref_cols), (fast_path, cols)):  # each reads the patches its im2col wrote
        gW, gb, gx = np.empty_like(W), np.empty_like(b), np.full_like(x, np.nan)  # every element must be written
        ops.conv_param_grads(x, patches, d, gW, gb, pad)
        ops.conv_input_grad(d, W, np.empty_like(cols), gx, pad)
        grads.append((gW, gb, gx))
    np.testing.assert_array_equal(grads[1][2], grads[0][2])  # dL/dx: the same GEMM, col2im in the same order
    tol = 1e-6 if dtype == np.float32 else 1e-13  # gW, gb: BLAS's sums (a GEMV for gb) vs NumPy's
    for fast, generic in zip(grads[1][:2], grads[0][:2]):
        np.testing.assert_allclose(fast, generic, rtol=tol, atol=tol)


@pytest.mark.parametrize("shape,p", [((2, 6, 6, 3), 2), ((2, 7, 9, 2), 2), ((1, 9, 7, 4), 3), ((3, 4, 4, 33), 2)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_pooling_equals_the_generic_one_bit_for_bit_with_ties_and_nan(shape, p, dtype, fast_path):
    x = np.random.default_rng(6).integers(-2, 3, shape).astype(dtype)  # few values: many ties
    x[0, 0, 0, 0], x[-1, -1, 0, -1] = np.nan, -np.inf
    results = []
    for ops in (GENERIC, fast_path):
        out, arg = pool(ops, x, p)
        r = np.random.default_rng(7).standard_normal(out.shape).astype(dtype)
        r[0, 0, 0, 1 % shape[3]] = -0.0
        gx = np.full_like(x, np.nan)  # every element must be written, the unread rows and columns too
        ops.maxpool_backward(r, arg, p, gx)
        gz = np.full_like(x, np.nan)  # and with the relu derivative of the pooling's input (x as a relu output)
        ops.maxpool_act_backward(r, arg, p, gz, x, "relu")
        results.append((out, arg, gx, gz))
    for fast, generic in zip(results[1], results[0]):
        np.testing.assert_array_equal(fast, generic)
        assert np.array_equal(np.signbit(fast), np.signbit(generic))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_the_compiled_relu_passes_equal_numpys_bit_for_bit(dtype, monkeypatch):
    """A conv layer's bias + relu and relu backward (rows of any shape): -0.0, NaN, inf as NumPy gives them."""
    from fastnn.backends import cpu_fused

    if cpu_fused.compiled() is None:
        pytest.skip("Numba is not installed (the fast extra): the NumPy sequences are the only path")
    rng = np.random.default_rng(8)
    h = rng.standard_normal((37, 5)).astype(dtype)
    h[0, :4] = [np.nan, -np.inf, np.inf, -0.0]
    b = rng.standard_normal(5).astype(dtype)
    b[4] = 0.0
    a = np.maximum(rng.standard_normal((3, 4, 6, 5)), 0).astype(dtype)
    a[0, 0, 0, :2] = [np.nan, -0.0]
    d = rng.standard_normal(a.shape).astype(dtype)
    d[0, 0, 1, :2] = [np.inf, -np.inf]
    results = []
    for compiled in (True, False):
        if not compiled:
            monkeypatch.setattr(cpu_fused, "_compiled", [None])
        ops, hc, dc = NumpyOps(), h.copy(), d.copy()
        ops.bias_act(hc, b, "relu")
        ops.act_backward(dc, a, "relu")
        results.append((hc, dc))
    for fast, numpy_path in zip(*results):
        np.testing.assert_array_equal(fast.view(f"u{fast.itemsize}"), numpy_path.view(f"u{fast.itemsize}"))
    generic = h[1:].copy()  # finite rows (NumPy's product by the mask makes relu(-inf) NaN, not 0)
    GENERIC.bias_act(generic, b, "relu")
    np.testing.assert_array_equal(results[0][0][1:], generic)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_translation_equals_the_generic_one_bit_for_bit(dtype, fast_path):
    """Both paths (the compiled one moves the images in one pass, no (B, H, W, C) temporaries), several steps."""
    x = np.random.default_rng(9).standard_normal((11, 7, 9, 3)).astype(dtype)
    for limit, seed, step in ((1, 3, 0), (2, 2 ** 32 - 5, 17), (6, -7, 2 ** 31 - 1)):
        got, want = np.full_like(x, np.nan), np.full_like(x, np.nan)
        fast_path.translate(x, got, limit, seed, np.array([step], np.int32), -0.5)
        GENERIC.translate(x, want, limit, seed, np.array([step], np.int32), -0.5)
        np.testing.assert_array_equal(got.view(f"u{x.itemsize}"), want.view(f"u{x.itemsize}"))
