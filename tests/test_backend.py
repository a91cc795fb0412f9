"""Every kernel override equals the generic ``Ops`` implementation (the oracle).

The NumPy overrides are checked here on the CPU; the same checks run against the
fused CuPy kernels when a GPU is present (``test_cupy_*``, skipped otherwise).
"""

import numpy as np
import pytest

import fastnn
from fastnn.backend import Ops

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
        for row in range(3):  # batch size 1, as in per-sample training
            g1, l1, h1 = xp.zeros_like(z[:1]), xp.zeros(1, dtype), xp.zeros(1, np.int32)
            getattr(ops, name)(z[row:row + 1], t["y"][row:row + 1], g1, l1, h1)
            out[f"{name}_b1_{row}"] = xp.concatenate([g1[0], l1, h1.astype(dtype)])
            getattr(ops, name)(z[row:row + 1], t["y"][row:row + 1], None, l1, h1)
            out[f"{name}_b1_nograd_{row}"] = xp.concatenate([l1, h1.astype(dtype)])
    t = arrays(xp, dtype)
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cupy_fused_kernels_equal_generic_kernels(cupy_ops, dtype):
    rtol = 1e-5 if dtype == np.float32 else 1e-12
    assert_same(run_kernels(cupy_ops, dtype), run_kernels(Ops(cupy_ops.xp), dtype), rtol)


@pytest.mark.gpu
def test_cupy_kernels_equal_numpy_kernels(cupy_ops):
    assert_same(run_kernels(cupy_ops, np.float64), run_kernels(fastnn.NumpyOps(), np.float64), 1e-12)


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
