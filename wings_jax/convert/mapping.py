"""Name and layout mapping between Hugging Face tensors and our parameter tree.

A model's mapping is a list of :class:`TensorRule`. The same list drives import (HF -> ours) and
export (ours -> HF), so the two directions cannot drift apart. Import reports every missing,
unexpected or mis-shaped tensor in one error.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Callable, Iterable, Iterator, Mapping, Sequence

import numpy as np
from tqdm import tqdm

from wings_jax.convert.hf_io import ConversionError

LINEAR, BIAS, COPY, CONV = "linear", "bias", "copy", "conv"


@dataclasses.dataclass(frozen=True)
class TensorRule:
    """One HF tensor (or one per layer, when ``hf`` contains ``{i}``) and the parameter it becomes.

    kind:
      - ``linear``: HF ``[out, in]`` matrix <-> our kernel ``in_dims + out_dims`` (``num_in`` input dims).
      - ``bias``: HF vector <-> our (possibly multi-dimensional, e.g. heads x head_dim) bias.
      - ``copy``: the same array.
      - ``conv``: HF conv ``[out, in, kh, kw]`` <-> our patch kernel ``(kh, kw, in, out)``.
    layers: for ``{i}`` rules, the HF layer indices present (others stay zero on import and are not exported).
    """

    hf: str
    path: str
    kind: str = COPY
    num_in: int = 1
    layers: tuple[int, ...] | None = None

    @property
    def stacked(self) -> bool:
        return "{i}" in self.hf


def _to_ours(kind: str, value: np.ndarray, shape: Sequence[int], num_in: int) -> np.ndarray:
    if kind == LINEAR:
        in_size = math.prod(shape[:num_in])
        if value.ndim != 2 or value.shape[1] != in_size or value.shape[0] != math.prod(shape[num_in:]):
            raise ValueError(f"shape {value.shape} cannot become {tuple(shape)}")
        return value.T.reshape(shape)
    if kind == CONV:
        if value.ndim != 4 or tuple(np.transpose(value, (2, 3, 1, 0)).shape) != tuple(shape):
            raise ValueError(f"shape {value.shape} cannot become {tuple(shape)}")
        return np.transpose(value, (2, 3, 1, 0))
    if (kind == COPY and tuple(value.shape) != tuple(shape)) or value.size != math.prod(shape):
        raise ValueError(f"shape {value.shape} cannot become {tuple(shape)}")
    return value.reshape(shape)


def _to_hf(kind: str, value: np.ndarray, num_in: int) -> np.ndarray:
    if kind == LINEAR:
        return np.ascontiguousarray(value.reshape(math.prod(value.shape[:num_in]), -1).T)
    if kind == CONV:
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if kind == BIAS:
        return value.reshape(-1)
    return value


def import_tensors(
    reader,
    rules: Sequence[TensorRule],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    num_layers: Mapping[str, int] | Callable[[str], int],
    ignore: Iterable[str] = (),
    hf_prefix: str = "",
    check_unexpected: bool = True,
    desc: str = "import",
) -> dict[str, np.ndarray]:
    """Reads every rule's tensors from ``reader`` into arrays of our ``shapes`` (path -> shape).

    ``num_layers(path)`` is the stacked depth of a parameter; ``ignore`` holds fnmatch patterns of HF
    names that may be present and are dropped; ``hf_prefix`` is prepended to every rule's HF name.
    """
    depth = num_layers if callable(num_layers) else (lambda p: num_layers[p])
    out: dict[str, np.ndarray] = {}
    missing, bad_shape, used = [], [], set()
    for rule in tqdm(rules, desc=desc, unit="tensor", leave=False):
        if rule.path not in shapes:
            raise ConversionError(f"internal mapping error: no parameter {rule.path!r} in the model")
        shape = shapes[rule.path]
        if rule.stacked:
            n = depth(rule.path)
            per_layer = shape[1:]
            layers = rule.layers if rule.layers is not None else range(n)
            stacked_value = None
            for i in layers:
                name = hf_prefix + rule.hf.format(i=i)
                value = _fetch(reader, name, rule, per_layer, missing, bad_shape, used)
                if value is None:
                    continue
                if stacked_value is None:
                    stacked_value = np.zeros((n, *per_layer), value.dtype)
                stacked_value[i] = value
            if stacked_value is not None:
                out[rule.path] = stacked_value
        else:
            value = _fetch(reader, hf_prefix + rule.hf, rule, shape, missing, bad_shape, used)
            if value is not None:
                out[rule.path] = value
    unexpected = []
    if check_unexpected:
        patterns = [hf_prefix + p for p in ignore]
        unexpected = sorted(
            k for k in reader.keys()
            if k not in used and k.startswith(hf_prefix) and not any(fnmatch.fnmatchcase(k, p) for p in patterns)
        )
    if missing or bad_shape or unexpected:
        lines = [f"cannot convert the weights in {getattr(reader, 'directory', '?')}:"]
        if missing:
            lines.append(f"  missing tensors ({len(missing)}): " + ", ".join(missing))
        if bad_shape:
            lines.append(f"  tensors of the wrong shape ({len(bad_shape)}): " + "; ".join(bad_shape))
        if unexpected:
            lines.append(f"  unexpected tensors ({len(unexpected)}): " + ", ".join(unexpected))
        lines.append("  Check that config.json describes these weights and that the directory is complete.")
        raise ConversionError("\n".join(lines))
    return out


def _fetch(reader, name, rule, shape, missing, bad_shape, used):
    if name not in reader:
        missing.append(name)
        return None
    used.add(name)
    value = reader[name]
    try:
        return _to_ours(rule.kind, value, shape, rule.num_in)
    except ValueError as e:
        bad_shape.append(f"{name}: {e}")
        return None


def export_tensors(
    params: Mapping[str, np.ndarray],
    rules: Sequence[TensorRule],
    *,
    dtype=None,
    hf_prefix: str = "",
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` for every rule; ``dtype`` casts (None keeps our dtype)."""
    for rule in rules:
        value = np.asarray(params[rule.path])
        if rule.stacked:
            layers = rule.layers if rule.layers is not None else range(value.shape[0])
            items = [(hf_prefix + rule.hf.format(i=i), value[i]) for i in layers]
        else:
            items = [(hf_prefix + rule.hf, value)]
        for name, v in items:
            v = _to_hf(rule.kind, v, rule.num_in)
            yield name, (v.astype(dtype) if dtype is not None else v)
