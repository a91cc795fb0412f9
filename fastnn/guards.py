"""Checks made before fastnn allocates a network or trusts its weights.

``check_fits``: a network's size, from a flag or a file's header, is checked against the
machine's memory before any array is allocated (a typo such as ``--hidden 1000000000`` is then
one line, not a MemoryError). ``nonfinite_params``: the NaN/inf values of a parameter arena,
named by parameter (``W2 (layer 2 weights)``), so that a model, stack or checkpoint whose
training diverged is refused on load, and never written.
"""

from __future__ import annotations

import os

import numpy as np

from .backends import resolve_dtype
from .config import DEFAULTS
from .errors import ConfigError, DataError
from .layers import image_shape_of, parse

# When the machine does not say how much memory it has: generous, but a typo's terabytes are still refused.
UNKNOWN_MEMORY = 1 << 40
BATCH = DEFAULTS.batch_size  # the batch the estimate allows workspace for


def physical_memory() -> int:
    """The machine's physical memory in bytes (``UNKNOWN_MEMORY`` where the OS does not say)."""
    try:
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return UNKNOWN_MEMORY
    return total if total > 0 else UNKNOWN_MEMORY


def format_bytes(n: int) -> str:
    """``n`` bytes in decimal units, e.g. "7.3 TB", "24 GB", "512 kB"."""
    for unit, size in (("EB", 10**18), ("PB", 10**15), ("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= size:
            value = n / size
            return f"{value:.1f} {unit}" if value < 10 else f"{value:.0f} {unit}"
    return f"{n} bytes"


def n_params(sizes) -> int:
    """The parameter count P of a network with these layer widths (weights and biases), an exact int."""
    sizes = [int(n) for n in sizes]
    return sum(fi * fo + fo for fi, fo in zip(sizes[:-1], sizes[1:]))


def training_bytes(sizes, dtype, n_models: int = 1, batch: int = BATCH, layers=None) -> int:
    """Bytes a network of layer widths ``sizes`` (ints) needs to train in ``dtype``: parameters,
    gradients and up to two optimizer-state arrays (Adam's), P values each, plus the batch
    buffers (inputs (B, D), activations and deltas (B, n) per layer); times ``n_models`` (a stack).
    layers: a conv net's ``fastnn.layers.Layer`` list (then only sizes[0] is read): its layers give the
    parameters and the widths, and each convolution adds its patches (their gradient reuses the buffer)."""
    sizes = [int(n) for n in sizes]
    if layers is None:
        params, patches = n_params(sizes), 0
    else:
        sizes = [sizes[0], *(l.width_out for l in layers)]
        params = sum(int(np.prod(l.weight_shape)) + l.size for l in layers if l.kind != "pool")
        patches = sum((l.width_out // l.size) * l.weight_shape[0] for l in layers if l.kind == "conv")
    per_model = 4 * params + int(batch) * (sizes[0] + 2 * sum(sizes[1:]) + patches)
    return int(n_models) * per_model * np.dtype(dtype).itemsize


def check_fits(sizes, dtype, n_models: int = 1, batch: int = BATCH, layers=None, spec=None) -> None:
    """ConfigError (one line) when ``training_bytes`` exceeds the machine's physical memory; it
    names the network (``spec``, a conv net's layer spec, or the widths) and both sizes. Pure
    arithmetic: nothing is allocated."""
    need, have = training_bytes(sizes, dtype, n_models, batch, layers), physical_memory()
    if need > have:
        stack = f"a stack of {n_models} " if n_models > 1 else "a "
        net = spec or "-".join(str(int(n)) for n in sizes)
        raise ConfigError(f"{stack}{net} network would need {format_bytes(need)} of memory (parameters, gradients, "
                          f"optimizer state, batch buffers, in {np.dtype(dtype).name}); this machine has "
                          f"{format_bytes(have)}")


def param_names(n_layers: int) -> list[str]:
    """``["W1 (layer 1 weights)", "b1 (layer 1 biases)", "W2 ...", ...]``: the arena order."""
    return [f"{kind}{l} (layer {l} {what})" for l in range(1, n_layers + 1)
            for kind, what in (("W", "weights"), ("b", "biases"))]


def nonfinite_params(arrays, sizes=None) -> list[tuple[str, int]]:
    """``[(name, count)]`` of the parameters holding NaN or infinite values, in arena order.

    arrays: the parameter list ``[W1, b1, W2, ...]`` (host arrays, any float dtype), or one arena
    (P,) laid out so (then ``sizes`` names its parameters; a stack's (K, P) counts over all K).
    Integer arrays are finite; a non-numeric dtype is a ValueError.
    """
    if sizes is not None:
        arena = np.asarray(arrays)
        if int(arena.shape[-1]) != n_params(sizes):
            return [("the parameter arena", _count(arena))] if _count(arena) else []
        arrays, off = [], 0
        for fi, fo in zip(list(sizes)[:-1], list(sizes)[1:]):
            arrays += [arena[..., off:off + fi * fo], arena[..., off + fi * fo:off + fi * fo + fo]]
            off += fi * fo + fo
    names = param_names(len(arrays) // 2) + ["an extra array"] * (len(arrays) % 2)
    return [(name, n) for name, a in zip(names, arrays) if (n := _count(a))]


def _count(a) -> int:
    a = np.asarray(a)
    if a.dtype.kind in "biu":
        return 0
    if a.dtype.kind not in "fc":
        raise ValueError(f"an array of dtype {a.dtype}, expected floats")
    return int(a.size - np.count_nonzero(np.isfinite(a)))


def describe_nonfinite(bad: list[tuple[str, int]]) -> str:
    """"parameter W2 (layer 2 weights) holds 12 NaN/inf values" (and how many other parameters do)."""
    name, n = bad[0]
    more = f" (and {len(bad) - 1} other parameter{'s' if len(bad) > 2 else ''})" if len(bad) > 1 else ""
    what = name if name.startswith("the ") else f"parameter {name}"
    return f"{what} holds {n} NaN/inf value{'s' if n != 1 else ''}{more}"


DIVERGED = "the training that wrote it diverged"


def file_params(path, meta: dict, arrays: dict) -> list[np.ndarray]:
    """A model file's ``[W1, b1, ...]`` (host arrays ``p0, p1, ...``), checked against its header before
    anything is allocated: the sizes must fit in memory (DataError naming the file) and give each
    array's shape (ValueError naming the array)."""
    sizes, dtype = [int(n) for n in meta["sizes"]], resolve_dtype(meta["dtype"])
    layers = None
    if meta.get("layers"):  # a conv net: the spec gives the shapes
        layers = parse(meta["layers"], image_shape_of(sizes[0], meta.get("image_shape")), sizes[-1])
        shapes = [s for l in layers if l.kind != "pool" for s in (l.weight_shape, (l.size,))]
    else:
        shapes = [s for fi, fo in zip(sizes[:-1], sizes[1:]) for s in ((fi, fo), (fo,))]
    try:
        check_fits(sizes, dtype, layers=layers, spec=meta.get("layers"))
    except ConfigError as exc:  # a valid file, perhaps, but not for this machine
        raise DataError(f"{path}: {exc}") from None
    params = []
    for i, shape in enumerate(shapes):
        p = arrays[f"p{i}"]
        if p.shape != shape:
            raise ValueError(f"array p{i} has shape {p.shape}, but the header's sizes {sizes} make it {shape}")
        params.append(p)
    return params
