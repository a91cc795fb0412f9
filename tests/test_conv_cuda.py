"""The conv nets' CUDA kernels (fastnn/backends/conv_kernels.cu) on the CPU, through the CUDA emulator.

Each kernel of ``CupyOps`` (implicit-GEMM convolution with bias and activation, its weight and input
gradients, max pooling and its gradient, random translation) against the generic NumPy oracle ``Ops(np)``
(1e-12 in float64, 1e-5 in float32; pooling and translation bit for bit), at odd sizes, one input channel
and several, both paddings, kernels 3 and 5, ragged batches and pooling ties; then a whole conv-net
training step on the emulated GPU against the NumPy backend, and a captured step against eager launches.
Sizes stay small: every thread of every block runs on the CPU.
"""

import warnings

import numpy as np
import pytest

import fastnn
from fastnn.backends import Ops

ORACLE = Ops(np)
TOL = {np.float64: 1e-12, np.float32: 1e-5}
CONVS = [  # (B, H, W, C_in, C_out, k, pad)
    (2, 7, 6, 1, 3, 3, 0),  # one channel, valid
    (3, 6, 7, 2, 17, 3, 1),  # same, C_out over one tile, a ragged batch
    (1, 8, 9, 3, 5, 5, 2),  # k 5, same, batch 1
    (2, 6, 5, 4, 2, 5, 0),  # k 5, valid: 2 x 1 outputs
]
ACTS = ("relu", "tanh", "sigmoid", "linear")


def conv_arrays(case, dtype, seed=0):
    B, H, W, C, N, k, pad = case
    rng = np.random.default_rng(seed)
    Ho, Wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    return {"x": rng.standard_normal((B, H, W, C)), "W": rng.standard_normal((k * k * C, N)),
            "b": rng.standard_normal(N), "d": rng.standard_normal((B, Ho, Wo, N)),
            "out": np.full((B, Ho, Wo, N), np.nan), "cols": np.full((B, Ho, Wo, k, k, C), np.nan),
            "gW": np.full((k * k * C, N), np.nan), "gb": np.full(N, np.nan), "gx": np.full((B, H, W, C), np.nan)}


def run(ops, host: dict, dtype, call, outputs) -> list:
    """``call(ops, arrays)`` on ops's copies (as ``dtype``) of the host arrays; the outputs, on the host."""
    a = {k: ops.xp.asarray(v.astype(dtype) if v.dtype.kind == "f" else v) for k, v in host.items()}
    call(ops, a)
    return [ops.to_host(a[k]) for k in outputs]


def same(ops, host, dtype, call, outputs, tol=None):
    tol = TOL[dtype] if tol is None else tol
    for name, got, want in zip(outputs, run(ops, host, dtype, call, outputs), run(ORACLE, host, dtype, call, outputs)):
        assert got.dtype == want.dtype, name
        if tol:
            np.testing.assert_allclose(got, want, rtol=tol, atol=tol, err_msg=name)
        else:
            np.testing.assert_array_equal(got, want, err_msg=name)


@pytest.fixture
def ops(emulated_gpu):
    from fastnn.backends.cupy_ops import CupyOps

    return CupyOps()  # not get_ops("gpu"): its self-check would replace a wrong kernel


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv_act_equals_the_oracle(ops, case, dtype):
    pad = case[6]
    for i, act in enumerate(ACTS if case == CONVS[1] else ("relu",)):
        host = conv_arrays(case, dtype, seed=i)
        same(ops, host, dtype, lambda o, a, act=act: o.conv_act(a["x"], a["W"], a["b"], a["cols"], a["out"], act,
                                                                 pad), ["out"])


def test_conv_act_rows_do_not_depend_on_the_batch(ops):
    """rowwise: each image's outputs, alone or in a batch of 3, are the same bits."""
    host = conv_arrays(CONVS[1], np.float32)
    whole = run(ops, host, np.float32, lambda o, a: o.conv_act(a["x"], a["W"], a["b"], a["cols"], a["out"],
                                                               "relu", 1, rowwise=True), ["out"])[0]
    one = {**host, "x": host["x"][1:2], "out": host["out"][1:2], "cols": host["cols"][1:2]}
    alone = run(ops, one, np.float32, lambda o, a: o.conv_act(a["x"], a["W"], a["b"], a["cols"], a["out"],
                                                              "relu", 1, rowwise=True), ["out"])[0]
    np.testing.assert_array_equal(alone[0], whole[1])


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
@pytest.mark.parametrize("split_rows", [512, 16])
def test_conv_param_grads_equal_the_oracle(ops, monkeypatch, case, dtype, split_rows):
    """Split rows 16: the summed rows in parts of a tile (partial sums, then conv_grad_sum); 512: one part."""
    from fastnn.backends import cupy_ops

    monkeypatch.setattr(cupy_ops, "CONV_SPLIT_ROWS", split_rows)
    pad, k = case[6], case[5]

    def call(o, a):
        if o is ORACLE:  # the generic version reads the patches
            o.im2col(a["x"], k, pad, a["cols"])
        o.conv_param_grads(a["x"], a["cols"], a["d"], a["gW"], a["gb"], pad)

    same(ops, conv_arrays(case, dtype), dtype, call, ["gW", "gb"])


@pytest.mark.parametrize("case", CONVS)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_conv_input_grad_equals_the_oracle(ops, case, dtype):
    pad = case[6]
    same(ops, conv_arrays(case, dtype), dtype, lambda o, a: o.conv_input_grad(a["d"], a["W"], a["cols"], a["gx"], pad),
         ["gx"])


def test_the_split_weight_gradient_has_at_most_max_splits_parts(ops, monkeypatch):
    from fastnn.backends import cupy_ops

    monkeypatch.setattr(cupy_ops, "CONV_SPLIT_ROWS", 1)
    monkeypatch.setattr(cupy_ops, "CONV_MAX_SPLITS", 5)
    case = CONVS[0]
    host = conv_arrays(case, np.float64)

    def call(o, a):
        o.im2col(a["x"], 3, 0, a["cols"])
        o.conv_param_grads(a["x"], a["cols"], a["d"], a["gW"], a["gb"], 0)

    same(ops, host, np.float64, call, ["gW", "gb"])
    assert [k[2] for k in ops._consts if k[:2] == ("buffer", "conv_partials")] == [(5, 10, 3)]


POOLS = [((2, 6, 6, 3), 2), ((3, 7, 9, 2), 2), ((1, 9, 7, 4), 3), ((2, 5, 5, 1), 5)]


def pool_arrays(shape, p, ties: bool, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.integers(-2, 3, shape).astype(float) if ties else rng.standard_normal(shape)
    out = (shape[0], shape[1] // p, shape[2] // p, shape[3])
    return {"x": x, "out": np.full(out, np.nan), "arg": np.full(out, -1, np.int8), "d": rng.standard_normal(out),
            "gx": np.full(shape, np.nan)}


@pytest.mark.parametrize("shape,p", POOLS)
@pytest.mark.parametrize("ties", [False, True])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_maxpool_and_its_gradient_equal_the_oracle_bit_for_bit(ops, shape, p, ties, dtype):
    """Ties (small integers): the first maximum in row-major order; rows and columns no window reads: 0."""
    def call(o, a):
        o.maxpool(a["x"], p, a["out"], a["arg"])
        o.maxpool_backward(a["d"], a["arg"], p, a["gx"])

    same(ops, pool_arrays(shape, p, ties), dtype, call, ["out", "arg", "gx"], tol=0)


def test_maxpool_with_nan_equals_the_oracle(ops):
    host = pool_arrays((1, 4, 4, 2), 2, True)
    host["x"][0, 0, 1, 0] = host["x"][0, 3, 3, 1] = np.nan

    def call(o, a):
        o.maxpool(a["x"], 2, a["out"], a["arg"])
        o.maxpool_backward(a["d"], a["arg"], 2, a["gx"])

    same(ops, host, np.float64, call, ["out", "arg", "gx"], tol=0)


@pytest.mark.parametrize("shape,limit,seed", [((5, 6, 7, 1), 2, 3), ((3, 5, 4, 3), 1, 2 ** 32 - 5),
                                              ((2, 3, 3, 2), 4, -7)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_translate_equals_the_oracle_bit_for_bit(ops, shape, limit, seed, dtype):
    """The step read from the device counter (no host read, so capturable); several steps."""
    for step in (0, 11, 2 ** 31 - 1):
        host = {"x": np.random.default_rng(step).standard_normal(shape), "out": np.full(shape, np.nan),
                "step": np.array([step], np.int32)}
        same(ops, host, dtype, lambda o, a: o.translate(a["x"], a["out"], limit, seed, a["step"], -0.5), ["out"], 0)


# ------------------------------------------------------------ a conv net's training step
SPEC = "conv4k3s,pool2,conv6k3,dense8"  # 10 x 10 images (moved by up to 1 pixel): 10x10x4, 5x5x4, 3x3x6, 8, 3


def conv_data(n=13, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 3, n)
    x = rng.integers(0, 256, (n, 100)).astype(np.uint8)
    return x, y


def train_conv(x, y, device, dtype="float64", cuda_graph=False, epochs=1, gemm="fastnn"):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a failed capture, or a kernel the self-check replaced, warns
        ops = fastnn.backends.get_ops(device, gemm=gemm) if device == "gpu" else device
        model = fastnn.MLP([100, 3], layers=SPEC, device=ops, dtype=dtype, seed=2, translate=1)
        opt = fastnn.make_optimizer("adam", model, 1e-2)
        hist = fastnn.fit(model, x, y, epochs=epochs, batch_size=5, optimizer=opt, seed=1, cuda_graph=cuda_graph,
                          lr_schedule="constant")
    return model, opt, hist


@pytest.fixture(params=["emulated", pytest.param("real", marks=pytest.mark.gpu)])
def gpu(request):
    """The emulated GPU (CPU only), then the real one (``pytest -m gpu``; skipped without one): the fake
    cupy module, or None."""
    if request.param == "emulated":
        return request.getfixturevalue("emulated_gpu")
    from conftest import gpu_ops

    gpu_ops()  # skips without a usable GPU
    return None


@pytest.mark.parametrize("gemm", ["fastnn", "cublas"])
def test_a_conv_net_trains_on_the_gpu_as_on_numpy(gpu, gemm):
    """Batch 5 of 13 (two full batches and a ragged one of 3), float64: the same parameters and loss (on
    hardware, also: the self-check replaced no conv kernel, which would warn). fastnn's implicit GEMMs
    never see a patch buffer (none is allocated); cuBLAS's path writes and reads them as NumPy does."""
    x, y = conv_data()
    on_gpu, _, hg = train_conv(x, y, "gpu", gemm=gemm)
    assert [c is None for c in on_gpu.workspace(5).cols] == [gemm == "fastnn" or k != "conv"
                                                             for k in (l.kind for l in on_gpu.layers)]
    cpu, _, hc = train_conv(x, y, "cpu")
    for pg, pc in zip(on_gpu.get_params(), cpu.get_params()):
        np.testing.assert_allclose(pg, pc, rtol=1e-10, atol=1e-12)
    assert hg[-1]["train_loss"] == pytest.approx(hc[-1]["train_loss"], rel=1e-10)
    np.testing.assert_allclose(on_gpu.predict_proba(x[:4]), cpu.predict_proba(x[:4]), rtol=1e-10, atol=1e-12)


def test_a_captured_conv_step_equals_uncaptured_bit_for_bit(gpu):
    """Capture refuses allocations, host copies and synchronisations: a conv step is capturable."""
    x, y = conv_data()
    eager, oe, he = train_conv(x, y, "gpu", "float32")
    launches = gpu.emulator_state.graph_launches if gpu else 0
    captured, oc, hc = train_conv(x, y, "gpu", "float32", cuda_graph=True)
    if gpu:
        assert gpu.emulator_state.graph_launches - launches == 2  # both full batches replayed
    for pe, pc in zip(eager.get_params(), captured.get_params()):
        np.testing.assert_array_equal(pc, pe)
    assert [(h["train_loss"], h["train_accuracy"]) for h in hc] == [(h["train_loss"], h["train_accuracy"]) for h in he]
    assert oc.steps == oe.steps
