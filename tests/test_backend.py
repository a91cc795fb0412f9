"""Every kernel override equals the generic ``Ops`` implementation (the oracle).

The NumPy overrides are checked here on the CPU; the same checks run against the
fused CuPy kernels when a GPU is present (``test_cupy_*``, skipped otherwise).
"""

import numpy as np
import pytest
from conftest import gpu_ops

import fastnn
from fastnn.backends import Dropout, Ops

ACTS = ["relu", "sigmoid", "tanh", "linear"]


def arrays(xp, dtype, seed=0, b=9, n=7):
    rng = np.random.default_rng(seed)
    return {
        "h": xp.asarray(rng.standard_normal((b, n)) * 3, dtype),
        "bias": xp.asarray(rng.standard_normal(n), dtype),
        "a": xp.asarray(rng.random((b, n)), dtype),
        "d": xp.asarray(rng.standard_normal((b, n)), dtype),
        "y": xp.asarray(rng.integers(0, n, b), np.int32),
        "u8": xp.asarray(rng.integers(0, 256, (20, n)), np.uint8),
        "idx": xp.asarray(rng.permutation(20)[:b]),
        "p": xp.asarray(rng.standard_normal(50), dtype),
        "g": xp.asarray(rng.standard_normal(50), dtype),
        "s1": xp.asarray(rng.standard_normal(50), dtype),
        "s2": xp.asarray(rng.random(50), dtype),
    }


def run_kernels(ops, dtype):
    """Run every kernel of ``ops`` on the same inputs; return the results as NumPy arrays."""
    xp, out = ops.xp, {}
    for act in ACTS:
        t = arrays(xp, dtype)
        ops.bias_act(t["h"], t["bias"], act)
        out[f"bias_{act}"] = t["h"]
        if act != "linear":
            ops.act_backward(t["d"], t["a"], act)
            out[f"back_{act}"] = t["d"]
    for name in ("xent", "mse"):
        t = arrays(xp, dtype)
        z = t["a"] if name == "mse" else t["h"]
        g, loss, hits = xp.zeros_like(z), xp.zeros(1, dtype), xp.zeros(1, np.int32)
        getattr(ops, name)(z, t["y"], g, loss, hits)
        out[f"{name}_grad"], out[f"{name}_loss"], out[f"{name}_hits"] = g, loss, hits
        loss2, hits2 = xp.zeros(1, dtype), xp.zeros(1, np.int32)
        getattr(ops, name)(z, t["y"], None, loss2, hits2)
        out[f"{name}_loss_nograd"] = loss2
        w = xp.asarray(np.linspace(0.0, 2.0, z.shape[0]), dtype)  # per-sample weights, one of them 0
        gw, lw, hw = xp.zeros_like(z), xp.zeros(1, dtype), xp.zeros(1, np.int32)
        getattr(ops, name)(z, t["y"], gw, lw, hw, w)
        out[f"{name}_weighted_grad"], out[f"{name}_weighted_loss"], out[f"{name}_weighted_hits"] = gw, lw, hw
        for row in range(3):  # batch size 1, as in per-sample training
            g1, l1, h1 = xp.zeros_like(z[:1]), xp.zeros(1, dtype), xp.zeros(1, np.int32)
            getattr(ops, name)(z[row:row + 1], t["y"][row:row + 1], g1, l1, h1)
            out[f"{name}_b1_{row}"] = xp.concatenate([g1[0], l1, h1.astype(dtype)])
            getattr(ops, name)(z[row:row + 1], t["y"][row:row + 1], None, l1, h1)
            out[f"{name}_b1_nograd_{row}"] = xp.concatenate([l1, h1.astype(dtype)])
    t = arrays(xp, dtype)
    zero_row = xp.concatenate([xp.zeros((1, 7), dtype), t["a"][1:]])  # mse: a row of zeros is clamped
    for name, z in (("xent", t["h"]), ("mse", zero_row), ("xent_stack", xp.stack([t["h"], 2 * t["h"]])),
                    ("mse_stack", xp.stack([t["a"], zero_row]))):
        proba = xp.empty_like(z)
        ops.probabilities(z, name.split("_")[0], proba)
        out[f"probabilities_{name}"] = proba
    rows = xp.empty((9, 7), dtype)
    ops.gather_rows(t["u8"], t["idx"], rows, 1 / 255, 0.25)
    out["gather_u8"] = rows
    rows2 = xp.empty((9, 7), dtype)
    ops.gather_rows(t["h"], t["idx"][:5] % 9, rows2[:5], 1.0, 0.0)
    out["gather_f"] = rows2[:5]
    labels = xp.empty(9, np.int32)
    ops.gather_labels(t["y"], t["idx"] % 9, labels)
    out["labels"] = labels
    gw = xp.empty((7, 7), dtype)
    ops.weight_grad(t["a"], t["d"], gw)
    out["weight_grad"] = gw
    gw1 = xp.empty((7, 7), dtype)
    ops.weight_grad(t["a"][:1], t["d"][:1], gw1)
    out["weight_grad_b1"] = gw1
    sb = xp.empty(7, dtype)
    ops.sum_rows(t["d"], sb)
    out["sum_rows"] = sb
    for b, m, n in ((9, 7, 7), (1, 20, 3), (37, 45, 21)):  # the fused layer calls, over several GEMM tiles
        rng = np.random.default_rng(b)
        a, w, bias = (xp.asarray(rng.standard_normal(s), dtype) for s in ((b, m), (m, n), (n,)))
        for act in ACTS:
            h = xp.empty((b, n), dtype)
            ops.linear_act(a, w, bias, h, act)
            out[f"linear_{act}_{b}"] = h
            d = xp.empty((b, m), dtype)
            ops.input_grad(h, w, xp.asarray(rng.random((b, m)), dtype), d, act)
            out[f"input_grad_{act}_{b}"] = d
        gw, gb = xp.empty((m, n), dtype), xp.empty(n, dtype)
        ops.param_grads(a, h, gw, gb)
        out[f"param_grads_{b}"], out[f"param_grads_bias_{b}"] = gw, gb
        for p in (0.3, 0.75):  # with dropout: the same masks on every backend
            drop = Dropout(p, 2 ** 31 + 5, xp.asarray([b * 1000 + 7], np.int32), 2)
            for act in ACTS:
                h = xp.empty((b, n), dtype)
                ops.linear_act(a, w, bias, h, act, drop)
                out[f"linear_{act}_{b}_drop{p}"] = h
                d = xp.empty((b, m), dtype)
                upstream = xp.asarray(rng.standard_normal((b, n)), dtype)
                ops.input_grad(upstream, w, xp.asarray(rng.random((b, m)), dtype), d, act, drop)
                out[f"input_grad_{act}_{b}_drop{p}"] = d
    for wd in (0.0, 0.01):
        t = arrays(xp, dtype)
        ops.sgd(t["p"], t["g"].copy(), 0.1, wd)
        out[f"sgd_{wd}"] = t["p"]
        for nesterov in (False, True):
            t = arrays(xp, dtype)
            for _ in range(3):
                ops.momentum(t["p"], t["g"].copy(), t["s1"], 0.1, 0.9, wd, nesterov)
            out[f"mom_{nesterov}_{wd}"], out[f"vel_{nesterov}_{wd}"] = t["p"], t["s1"]
        t = arrays(xp, dtype)
        steps = xp.zeros(1, np.int32)
        for _ in range(3):
            ops.adam(t["p"], t["g"].copy(), t["s1"], t["s2"], steps, 0.01, 0.9, 0.999, 1e-8, wd)
        out[f"adam_{wd}"], out[f"adam_m_{wd}"], out[f"adam_v_{wd}"] = t["p"], t["s1"], t["s2"]
        out[f"adam_t_{wd}"] = steps
    return {k: ops.to_host(v) for k, v in out.items()}


def assert_same(got, want, rtol):
    assert got.keys() == want.keys()
    for k in want:
        assert got[k].dtype == want[k].dtype, k
        np.testing.assert_allclose(got[k], want[k], rtol=rtol, atol=rtol, err_msg=k)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_numpy_overrides_equal_generic_kernels(dtype):
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_same(run_kernels(fastnn.NumpyOps(), dtype), run_kernels(Ops(np), dtype), rtol)


def unchecked_cupy_ops():
    """A new ``CupyOps`` (skips without a GPU): the instance ``get_ops("gpu")`` hands out has had each
    kernel that failed its self-check replaced by the generic path, which would hide it from these tests."""
    gpu_ops()
    from fastnn.backends.cupy_ops import CupyOps

    return CupyOps()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_fused_kernels_equal_generic_kernels(dtype):
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    ops = unchecked_cupy_ops()
    assert_same(run_kernels(ops, dtype), run_kernels(Ops(ops.xp), dtype), rtol)


@pytest.mark.parametrize("gemm", ["fastnn", "cublas"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_emulated_cuda_kernels_equal_generic_kernels(emulated_gpu, dtype, gemm):
    from fastnn.backends.cupy_ops import CupyOps

    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_same(run_kernels(CupyOps(gemm), dtype), run_kernels(Ops(np), dtype), rtol)


@pytest.mark.gpu
def test_cupy_kernels_equal_numpy_kernels():
    assert_same(run_kernels(unchecked_cupy_ops(), np.float64), run_kernels(fastnn.NumpyOps(), np.float64), 1e-12)


def check_layer_gemms(ops, b, m, n, seed=0):
    """linear_act, input_grad and param_grads of a (b, m) -> (b, n) layer on ``ops`` equal the generic
    ``Ops`` (float64, relu, no dropout): fan-in m, fan-out n, batch b."""
    oracle, rng = Ops(np), np.random.default_rng(seed)
    host = [rng.standard_normal(s) for s in ((b, m), (m, n), (n,), (b, n))] + [rng.random((b, m))]
    results = []
    for o in (ops, oracle):
        a, w, bias, up, prev = (o.xp.asarray(h) for h in host)
        h, d, gw, gb = o.xp.empty((b, n)), o.xp.empty((b, m)), o.xp.empty((m, n)), o.xp.empty(n)
        o.linear_act(a, w, bias, h, "relu")
        o.input_grad(up, w, prev, d, "relu")
        o.param_grads(a, up, gw, gb)
        results.append([o.to_host(x) for x in (h, d, gw, gb)])
    for name, got, want in zip(("linear_act", "input_grad", "weight gradient", "bias gradient"), *results):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12, err_msg=f"{name} of {b}x{m} -> {n}")


# fan-ins that are multiples of the GEMM tile (16) and ragged ones; batches (the weight gradient's sum) too
LAYER_SHAPES = [(33, 784, 32), (32, 256, 24), (16, 128, 10), (37, 45, 21), (1, 17, 16)]


@pytest.mark.parametrize("b,m,n", LAYER_SHAPES)
def test_emulated_layer_gemms_at_tile_aligned_and_ragged_widths(emulated_gpu, b, m, n):
    """A weight_grad launch whose bias row (row m of m + 1) falls in a tile of its own when 16 divides m."""
    from fastnn.backends.cupy_ops import CupyOps

    check_layer_gemms(CupyOps(), b, m, n)  # not get_ops("gpu"): its self-check would replace a wrong kernel


@pytest.mark.parametrize("rows", [1, 16, 17, 65535 * 16, 65535 * 16 + 1, 2 ** 31 - 1])
def test_gemm_grids_fit_the_hardware_limits(emulated_gpu, rows):
    """Row tiles past grid.y's 65535 are taken in turn by the blocks (kernels.cu's FOR_ROW_TILES)."""
    import cuda_emulator

    from fastnn.backends.cupy_ops import MAX_GRID_Y, _gemm_grid

    grid = _gemm_grid(rows, 784, 3)
    cuda_emulator.check_launch(grid, (16, 16))  # a RuntimeError for what a GPU refuses
    assert grid == (49, min(-(-rows // 16), 65535), 3) and MAX_GRID_Y == 65535


@pytest.mark.parametrize("max_grid_y", [1, 3])
def test_emulated_gemms_with_more_row_tiles_than_blocks_on_grid_y(emulated_gpu, monkeypatch, max_grid_y):
    """As a GEMM of over 65535 row tiles runs, with the limit lowered so that it stays small: each
    block takes several row tiles (batch 117: 8 tiles; the weight gradient's 66 rows: 5)."""
    from fastnn.backends import cupy_ops

    monkeypatch.setattr(cupy_ops, "MAX_GRID_Y", max_grid_y)
    check_layer_gemms(cupy_ops.CupyOps(), 16 * 7 + 5, 16 * 4 + 1, 20)
    x, y = np.random.default_rng(1).standard_normal((487, 65)), np.arange(487) % 3
    gpu = fastnn.MLP([65, 40, 3], device=cupy_ops.CupyOps(), dtype="float64", seed=2)
    cpu = gpu.clone(device="cpu")
    (lg, gg), (lc, gc) = gpu.gradients(x, y), cpu.gradients(x, y)
    assert lg == pytest.approx(lc, rel=1e-12)
    for a, b in zip(gg, gc):
        np.testing.assert_allclose(a, b, rtol=1e-10, atol=1e-13)


def test_sigmoid_is_stable_for_large_inputs():
    ops = fastnn.NumpyOps()
    h = np.array([[-1000.0, -30.0, 0.0, 30.0, 1000.0]], np.float32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        ops.bias_act(h, np.zeros(5, np.float32), "sigmoid")
    np.testing.assert_allclose(h[0], [0.0, 0.0, 0.5, 1.0, 1.0], atol=1e-7)


def test_xent_is_stable_for_huge_logits():
    ops = fastnn.NumpyOps()
    z = np.array([[1e4, 0.0, -1e4], [0.0, 0.0, 0.0]], np.float32)
    y = np.array([0, 2], np.int32)
    g, loss, hits = np.zeros_like(z), np.zeros(1, np.float32), np.zeros(1, np.int32)
    with np.errstate(over="raise", invalid="raise", divide="raise"):
        ops.xent(z, y, g, loss, hits)
    assert loss[0] == pytest.approx(np.log(3.0), rel=1e-6)
    assert hits[0] == 1  # row 1 is a three-way tie; argmax takes class 0
    assert np.isfinite(g).all()


@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
@pytest.mark.parametrize("wd", [0.0, 0.05])
def test_optimizers_match_pytorch(name, wd, torch):
    rng = np.random.default_rng(0)
    p0 = rng.standard_normal(30)
    grads = [rng.standard_normal(30) for _ in range(5)]

    class Arena:  # the smallest thing an Optimizer needs
        ops = fastnn.NumpyOps()
        params = p0.copy()
        grads = np.zeros(30)

    arena = Arena()
    opt = fastnn.make_optimizer(name, arena, lr=0.05, momentum=0.8, weight_decay=wd)
    tp = torch.tensor(p0.copy(), requires_grad=True)
    if name == "adam":
        topt = torch.optim.AdamW([tp], lr=0.05, weight_decay=wd)
    else:
        topt = torch.optim.SGD([tp], lr=0.05, momentum=0.0 if name == "sgd" else 0.8,
                               nesterov=name == "nesterov", weight_decay=wd)
    for g in grads:
        arena.grads[...] = g
        opt.step()
        tp.grad = torch.tensor(g)
        topt.step()
    np.testing.assert_allclose(arena.params, tp.detach().numpy(), rtol=1e-12, atol=1e-12)


# ------------------------------------------------ one test per kernel, every backend
# Each kernel against a float64 expectation written out here from its formula, on the
# generic oracle, on NumpyOps and (with a GPU) on CupyOps.
@pytest.fixture(params=["generic", "numpy", "emulated-cupy", pytest.param("cupy", marks=pytest.mark.gpu)])
def ops(request):
    if request.param == "generic":
        return Ops(np)
    if request.param == "numpy":
        return fastnn.NumpyOps()
    if request.param == "emulated-cupy":
        request.getfixturevalue("emulated_gpu")
        from fastnn.backends.cupy_ops import CupyOps

        return CupyOps()  # not get_ops("gpu"), whose self-check replaces a kernel it finds wrong
    return unchecked_cupy_ops()


def host(ops, a):
    return ops.to_host(a).astype(np.float64)


@pytest.mark.parametrize("act", ACTS)
def test_bias_act(ops, act):
    t = arrays(ops.xp, np.float64)
    z = host(ops, t["h"]) + host(ops, t["bias"])
    want = {"relu": np.maximum(z, 0), "sigmoid": 1 / (1 + np.exp(-z)), "tanh": np.tanh(z), "linear": z}[act]
    ops.bias_act(t["h"], t["bias"], act)
    np.testing.assert_allclose(host(ops, t["h"]), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("act", ["relu", "sigmoid", "tanh"])
def test_act_backward(ops, act):
    t = arrays(ops.xp, np.float64)
    a, d = host(ops, t["a"]), host(ops, t["d"])
    want = d * {"relu": a > 0, "sigmoid": a * (1 - a), "tanh": 1 - a * a}[act]
    ops.act_backward(t["d"], t["a"], act)
    np.testing.assert_allclose(host(ops, t["d"]), want, rtol=1e-13, atol=1e-15)


@pytest.mark.parametrize("b", [1, 9])
def test_xent(ops, b):
    t = arrays(ops.xp, np.float64)
    z, y = host(ops, t["h"])[:b], ops.to_host(t["y"])[:b]
    p = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    onehot = np.eye(z.shape[1])[y]
    grad, loss, hits = ops.xp.zeros((b, z.shape[1])), ops.xp.zeros(1), ops.xp.zeros(1, np.int32)
    ops.xent(t["h"][:b], t["y"][:b], grad, loss, hits)
    np.testing.assert_allclose(host(ops, grad), (p - onehot) / b, rtol=1e-12, atol=1e-15)
    assert host(ops, loss)[0] == pytest.approx(-np.log(p[np.arange(b), y]).sum(), rel=1e-12)
    assert host(ops, hits)[0] == np.sum(z.argmax(axis=1) == y)


@pytest.mark.parametrize("loss", ["xent", "mse"])
def test_probabilities(ops, loss):
    t = arrays(ops.xp, np.float64)
    z = host(ops, t["h"] if loss == "xent" else t["a"])
    want = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True) if loss == "xent" else z / z.sum(axis=1, keepdims=True)
    proba = ops.xp.empty(z.shape)
    ops.probabilities(t["h"] if loss == "xent" else t["a"], loss, proba)
    np.testing.assert_allclose(host(ops, proba), want, rtol=1e-12)


def test_mse(ops):
    t = arrays(ops.xp, np.float64)
    out, y = host(ops, t["a"]), ops.to_host(t["y"])
    (b, k), diff = out.shape, out - np.eye(out.shape[1])[y]
    grad, loss, hits = ops.xp.zeros((b, k)), ops.xp.zeros(1), ops.xp.zeros(1, np.int32)
    ops.mse(t["a"], t["y"], grad, loss, hits)
    np.testing.assert_allclose(host(ops, grad), 2 * diff * out * (1 - out) / (b * k), rtol=1e-12, atol=1e-15)
    assert host(ops, loss)[0] == pytest.approx((diff ** 2).sum() / k, rel=1e-12)
    assert host(ops, hits)[0] == np.sum(out.argmax(axis=1) == y)


def test_gather_rows_and_labels(ops):
    t = arrays(ops.xp, np.float64)
    u8, idx = ops.to_host(t["u8"]), ops.to_host(t["idx"])
    rows = ops.xp.zeros((9, 7))
    ops.gather_rows(t["u8"], t["idx"], rows, 1 / 255, 0.25)
    np.testing.assert_allclose(host(ops, rows), u8[idx] / 255 + 0.25, rtol=1e-15)
    labels = ops.xp.zeros(9, np.int32)
    ops.gather_labels(t["y"], t["idx"] % 9, labels)
    np.testing.assert_array_equal(ops.to_host(labels), ops.to_host(t["y"])[idx % 9])


def test_matmul_weight_grad_sum_rows(ops):
    t = arrays(ops.xp, np.float64)
    a, d = host(ops, t["a"]), host(ops, t["d"])
    out = ops.xp.zeros((7, 7))
    ops.weight_grad(t["a"], t["d"], out)
    np.testing.assert_allclose(host(ops, out), a.T @ d, rtol=1e-13)
    mm = ops.xp.zeros((9, 9))
    ops.matmul(t["d"], t["a"].T, mm)
    np.testing.assert_allclose(host(ops, mm), d @ a.T, rtol=1e-13)
    s = ops.xp.zeros(7)
    ops.sum_rows(t["d"], s)
    np.testing.assert_allclose(host(ops, s), d.sum(axis=0), rtol=1e-13)


def arena(ops, *values):
    return [ops.xp.asarray(np.array(v, np.float64)) for v in values]


@pytest.mark.parametrize("wd,want", [(0.0, [0.95, -2.025]), (0.1, [0.94, -2.005])])
def test_sgd_by_hand(ops, wd, want):
    # p - lr (g + wd p) with p = (1, -2), g = (0.5, 0.25), lr 0.1
    p, g = arena(ops, [1.0, -2.0], [0.5, 0.25])
    ops.sgd(p, g, 0.1, wd)
    np.testing.assert_allclose(host(ops, p), want, rtol=1e-15)


@pytest.mark.parametrize("nesterov,want", [(False, [0.855, -2.0725]), (True, [0.7695, -2.11525])])
def test_momentum_by_hand(ops, nesterov, want):
    # two steps of g = (0.5, 0.25), lr 0.1, mu 0.9 from p = (1, -2):
    # heavy ball: v1 = g, p1 = p - 0.1 g; v2 = 0.9 g + g = 1.9 g, p2 = p1 - 0.19 g  -> p - 0.29 g
    # Nesterov:   p1 = p - 0.1 (g + 0.9 g) = p - 0.19 g; p2 = p1 - 0.1 (g + 0.9 * 1.9 g) = p - 0.461 g
    p, v = arena(ops, [1.0, -2.0], [0.0, 0.0])
    for _ in range(2):
        ops.momentum(p, arena(ops, [0.5, 0.25])[0], v, 0.1, 0.9, 0.0, nesterov)
    np.testing.assert_allclose(host(ops, p), want, rtol=1e-14)
    np.testing.assert_allclose(host(ops, v), [0.95, 0.475], rtol=1e-14)


def test_adam_by_hand(ops):
    # AdamW, lr 0.1, b1 0.9, b2 0.999, eps 1e-8, wd 0.01, p = (1, -2), g = (0.5, -0.25) twice.
    # With a constant g, m_hat = g and v_hat = g^2 at every step, so each step moves p by
    # lr (g / (|g| + eps) + wd p): about lr sign(g), plus the decoupled decay.
    p, m, v = arena(ops, [1.0, -2.0], [0.0, 0.0], [0.0, 0.0])
    t = ops.xp.zeros(1, np.int32)
    want = np.array([1.0, -2.0])
    g = np.array([0.5, -0.25])
    for _ in range(2):
        ops.adam(p, arena(ops, g)[0], m, v, t, 0.1, 0.9, 0.999, 1e-8, 0.01)
        want -= 0.1 * (g / (np.abs(g) + 1e-8) + 0.01 * want)
    np.testing.assert_allclose(host(ops, p), want, rtol=1e-12)
    np.testing.assert_allclose(host(ops, m), (1 - 0.9 ** 2) * g, rtol=1e-14)
    np.testing.assert_allclose(host(ops, v), (1 - 0.999 ** 2) * g * g, rtol=1e-12)
    assert int(ops.to_host(t)[0]) == 2


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["adam", "momentum"])
def test_optimizer_state_decaying_below_the_normal_range_is_flushed_to_zero(ops, name, dtype):
    """A parameter whose gradient stays zero has its state decay by b1 (mu) each step; once below the
    smallest normal number (slow operands on x86) it is stored as +0, on every backend; the rest is
    untouched."""
    tiny = np.finfo(dtype).tiny
    start = np.array([1.05, 1.0005, -1.05, 3.0, 0.5, -0.0], dtype) * tiny  # 0.5 tiny: subnormal already

    def arr(values):
        return ops.xp.asarray(np.array(values, dtype))  # a copy, on every backend

    p, g, m, v = arr(np.ones(6)), arr(np.zeros(6)), arr(start), arr(np.abs(start))
    if name == "adam":
        ops.adam(p, g, m, v, ops.xp.zeros(1, np.int32), 1e-3, 0.9, 0.999, 1e-8, 0.0)
        states = [(m, start * dtype(0.9), [0, 0, 0, 1, 0, 0]), (v, np.abs(start) * dtype(0.999), [1, 0, 1, 1, 0, 0])]
    else:
        ops.momentum(p, g, v, 1e-3, 0.9, 0.0, False)
        states = [(v, np.abs(start) * dtype(0.9), [0, 0, 0, 1, 0, 0])]
    for state, decayed, kept in states:
        got = host(ops, state)
        np.testing.assert_array_equal(got, np.where(kept, decayed, 0))
        assert not np.signbit(got).any() and np.all((got == 0) | (np.abs(got) >= tiny))


def test_dropout_masks_are_a_deterministic_hash_of_seed_step_layer_and_element():
    ops = Ops(np)
    step = np.array([3], np.int32)
    keep = ops.dropout_keep((200, 300), Dropout(0.25, 7, step, 1))
    assert keep.dtype == bool and abs(keep.mean() - 0.75) < 0.01
    np.testing.assert_array_equal(ops.dropout_keep((200, 300), Dropout(0.25, 7, step, 1)), keep)
    for other in (Dropout(0.25, 8, step, 1), Dropout(0.25, 7, np.array([4], np.int32), 1),
                  Dropout(0.25, 7, step, 2)):
        assert 0.3 < np.mean(ops.dropout_keep((200, 300), other) == keep) < 0.9  # a different mask
    # the first elements, from the hash written out (lowbias32, as in kernels.cu)
    def mix(x):
        x ^= x >> 16
        x = (x * 0x7FEB352D) & 0xFFFFFFFF
        x ^= x >> 15
        x = (x * 0x846CA68B) & 0xFFFFFFFF
        return x ^ (x >> 16)
    want = [(mix(7 ^ mix(3 ^ mix(1 ^ mix(e ^ mix(0))))) >> 8) >= round(0.25 * 2 ** 24) for e in range(20)]
    np.testing.assert_array_equal(keep.ravel()[:20], want)


def test_numpy_dropout_masks_equal_the_generic_ones_bit_for_bit():
    """NumpyOps computes the mask in place and keeps the last step's per (shape, layer) for the backward
    pass: every mask must still be the generic hash's, whatever was asked before."""
    from fastnn.backends.numpy_ops import NumpyOps

    fast, generic = NumpyOps(), Ops(np)
    step = np.array([0], np.int32)
    for shape, seed, layer, steps in (((128, 256), 0, 0, (0, 1, 1, 2)), ((7, 33), 2 ** 32 - 1, 3, (5, 2 ** 31 - 1)),
                                      ((128, 256), 9, 0, (2, 2)), ((128, 256), 0, 1, (2,))):
        for s in steps:
            step[0] = s
            for p in (0.2, 0.5):
                d = Dropout(p, seed, step, layer)
                keep = fast.dropout_keep(shape, d)
                assert keep.shape == shape and keep.dtype == bool
                np.testing.assert_array_equal(keep, generic.dropout_keep(shape, d))
    step[0] = 1
    first = fast.dropout_keep((128, 256), Dropout(0.2, 0, step, 0))
    step[0] = 2
    second = fast.dropout_keep((128, 256), Dropout(0.2, 0, step, 0))
    assert not np.array_equal(first, second)  # a new step, a new mask: the kept one is not handed out
    np.testing.assert_array_equal(first, generic.dropout_keep((128, 256), Dropout(0.2, 0, np.array([1]), 0)))


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_numpy_relu_dropout_layer_calls_equal_the_generic_ones(p):
    from fastnn.backends.numpy_ops import NumpyOps

    fast, generic = NumpyOps(), Ops(np)
    rng = np.random.default_rng(3)
    a, w, b = rng.standard_normal((64, 50)), rng.standard_normal((50, 40)), rng.standard_normal(40)
    drop = Dropout(p, 11, np.array([4], np.int32), 1)
    h = {}
    for name, ops in (("fast", fast), ("generic", generic)):
        h[name] = np.empty((64, 40))
        ops.linear_act(a, w, b, h[name], "relu", drop)
    np.testing.assert_array_equal(h["fast"], h["generic"])
    upstream, prev = rng.standard_normal((64, 40)), np.maximum(rng.standard_normal((64, 50)), 0)
    d = {}
    for name, ops in (("fast", fast), ("generic", generic)):
        d[name] = np.empty((64, 50))
        ops.input_grad(upstream, w, prev, d[name], "relu", drop)
    np.testing.assert_array_equal(d["fast"], d["generic"])


@pytest.fixture
def numpy_sequence(monkeypatch):
    """A switch to NumpyOps' ufunc sequences instead of cpu_fused's compiled loops."""
    from fastnn.backends import cpu_fused

    if cpu_fused.compiled() is None:
        pytest.skip("Numba is not installed (the fast extra): the ufunc sequences are the only path")
    return lambda: monkeypatch.setattr(cpu_fused, "_compiled", [None])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("wd", [0.0, 0.01])
@pytest.mark.parametrize("name", ["sgd", "momentum", "nesterov", "adam"])
def test_fused_cpu_updates_equal_the_ufunc_sequences_bit_for_bit(numpy_sequence, name, wd, dtype):
    def steps(ops):
        rng = np.random.default_rng(5)
        n = fastnn.backends.numpy_ops.FUSED_MIN_SIZE  # the smallest arena the fused loops serve
        p, m, v = (rng.standard_normal(n).astype(dtype) for _ in range(3))
        tiny = np.finfo(dtype).tiny
        m[:64] = v[:64] = tiny * np.linspace(0.5, 2.0, 64, dtype=dtype)  # zero gradients there: flushed on the way
        v = np.abs(v)
        t = np.zeros(1, np.int32)
        for _ in range(4):
            g = rng.standard_normal(n).astype(dtype)
            g[:64] = 0
            if name == "sgd":
                ops.sgd(p, g, 0.05, wd)
            elif name == "adam":
                ops.adam(p, g, m, v, t, 0.01, 0.9, 0.999, 1e-8, wd)
            else:
                ops.momentum(p, g, v, 0.05, 0.9, wd, name == "nesterov")
        if name == "adam" or name != "sgd" and not wd:  # (momentum's weight decay feeds v: no decay to zero)
            state = v if name != "adam" else np.concatenate([m, v])
            assert np.count_nonzero(state[:64] == 0) > 0 and not np.any((state != 0) & (np.abs(state) < tiny))
        return p, m, v

    arena = np.zeros(fastnn.backends.numpy_ops.FUSED_MIN_SIZE, dtype)
    assert fastnn.NumpyOps._fused((arena,), 0.1, 0.0) is not None  # this arena takes the compiled loops
    assert fastnn.NumpyOps._fused((arena[1:],), 0.1, 0.0) is None  # a smaller one does not,
    assert fastnn.NumpyOps._fused((np.zeros((len(arena), 2), dtype)[:, 0],), 0.1, 0.0) is None  # nor a strided one
    fused = steps(fastnn.NumpyOps())
    numpy_sequence()
    assert fastnn.NumpyOps._fused((arena,), 0.1, 0.0) is None
    for a, b in zip(fused, steps(fastnn.NumpyOps())):
        np.testing.assert_array_equal(a, b)


def test_training_with_the_fused_updates_is_the_same_bit_for_bit(numpy_sequence, synthetic):
    x, y = synthetic[0][:600], synthetic[1][:600]

    def train():
        m = fastnn.MLP([784, 96, 10], seed=3)  # 76330 parameters: the fused updates serve it
        fastnn.fit(m, x, y, epochs=2, batch_size=50, lr=1e-3, optimizer="adam", weight_decay=1e-2,
                   lr_schedule="constant")
        return m.params

    fused = train()
    numpy_sequence()
    np.testing.assert_array_equal(fused, train())
