"""Name and layout mapping between Hugging Face tensors and our parameter tree.

A model's mapping is a list of :class:`TensorRule`. The same list drives import (HF -> ours) and
export (ours -> HF), so the two directions cannot drift apart. Import reports every missing,
unexpected or mis-shaped tensor in one error.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math
from typing import Iterable, Iterator, Mapping, Sequence

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


def _fits(kind: str, hf_shape: Sequence[int], shape: Sequence[int], num_in: int) -> bool:
    """Whether an HF tensor of ``hf_shape`` becomes our parameter of ``shape`` under ``kind``."""
    hf_shape, shape = tuple(hf_shape), tuple(shape)
    if kind == LINEAR:
        return hf_shape == (math.prod(shape[num_in:]), math.prod(shape[:num_in]))
    if kind == CONV:
        return len(hf_shape) == 4 and (hf_shape[2], hf_shape[3], hf_shape[1], hf_shape[0]) == shape
    if kind == COPY:
        return hf_shape == shape
    return math.prod(hf_shape) == math.prod(shape)


def _to_ours(kind: str, value: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    """``value`` (checked by :func:`_fits`) in our layout."""
    if kind == LINEAR:
        return value.T.reshape(shape)
    if kind == CONV:
        return np.transpose(value, (2, 3, 1, 0))
    return value.reshape(shape)


def _to_hf(kind: str, value: np.ndarray, num_in: int) -> np.ndarray:
    if kind == LINEAR:
        return np.ascontiguousarray(value.reshape(math.prod(value.shape[:num_in]), -1).T)
    if kind == CONV:
        return np.ascontiguousarray(np.transpose(value, (3, 2, 0, 1)))
    if kind == BIAS:
        return value.reshape(-1)
    return value


def _hf_names(rule: TensorRule, shape: Sequence[int]) -> list[tuple[int | None, str]]:
    """(layer index or None, HF name) of every tensor of ``rule``; a stacked parameter's own leading
    dimension is its depth, so each rule is stacked as deep as the model it belongs to."""
    if not rule.stacked:
        return [(None, rule.hf)]
    layers = rule.layers if rule.layers is not None else range(shape[0])
    return [(i, rule.hf.format(i=i)) for i in layers]


def check_tensors(
    reader,
    rules: Sequence[TensorRule],
    shapes: Mapping[str, tuple[int, ...]],
    *,
    ignore: Iterable[str] = (),
) -> None:
    """Checks names and shapes only (``reader.keys()``, ``in`` and ``reader.shape``; no value is read):
    one error lists every missing, mis-shaped and unexpected tensor. ``ignore`` holds fnmatch patterns of
    HF names that may be present and are dropped."""
    missing, bad_shape, used = [], [], set()
    for rule in rules:
        if rule.path not in shapes:
            raise ConversionError(f"internal mapping error: no parameter {rule.path!r} in the model")
        shape = tuple(shapes[rule.path])
        target = shape[1:] if rule.stacked else shape
        for _, name in _hf_names(rule, shape):
            if name not in reader:
                missing.append(name)
                continue
            used.add(name)
            if not _fits(rule.kind, reader.shape(name), target, rule.num_in):
                bad_shape.append(f"{name}: shape {tuple(reader.shape(name))} cannot become {target}")
    unexpected = sorted(k for k in reader.keys()
                        if k not in used and not any(fnmatch.fnmatchcase(k, p) for p in ignore))
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


def import_tensors(reader, rules: Sequence[TensorRule], shapes: Mapping[str, tuple[int, ...]], *,
                   ignore: Iterable[str] = (), desc: str = "import") -> dict[str, np.ndarray]:
    """Reads every rule's tensors from ``reader`` into arrays of our ``shapes`` (path -> shape), after
    :func:`check_tensors` found every name and shape right."""
    check_tensors(reader, rules, shapes, ignore=ignore)
    out: dict[str, np.ndarray] = {}
    for rule in tqdm(rules, desc=desc, unit="tensor", leave=False):
        shape = tuple(shapes[rule.path])
        if not rule.stacked:
            out[rule.path] = _to_ours(rule.kind, reader[rule.hf], shape)
            continue
        stacked_value = None
        for i, name in _hf_names(rule, shape):
            value = _to_ours(rule.kind, reader[name], shape[1:])
            if stacked_value is None:  # layers a rule does not list stay zero
                stacked_value = np.zeros(shape, value.dtype)
            stacked_value[i] = value
        if stacked_value is not None:
            out[rule.path] = stacked_value
    return out


def export_tensors(
    params: Mapping[str, np.ndarray],
    rules: Sequence[TensorRule],
    *,
    dtype=None,
) -> Iterator[tuple[str, np.ndarray]]:
    """Yields ``(hf_name, array)`` for every rule; ``dtype`` casts (None keeps our dtype)."""
    for rule in rules:
        value = np.asarray(params[rule.path])
        if rule.stacked:
            layers = rule.layers if rule.layers is not None else range(value.shape[0])
            items = [(rule.hf.format(i=i), value[i]) for i in layers]
        else:
            items = [(rule.hf, value)]
        for name, v in items:
            v = _to_hf(rule.kind, v, rule.num_in)
            yield name, (v.astype(dtype) if dtype is not None else v)
