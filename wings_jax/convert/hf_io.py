"""Reading and writing Hugging Face style model directories (config.json + safetensors), without torch."""
from __future__ import annotations

import json
import os
from typing import Iterable, Mapping

import ml_dtypes  # noqa: F401  (registers numpy's bfloat16, so bf16 safetensors read as numpy arrays)
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file or tensors at fault."""


def read_config(directory: str) -> dict:
    if not os.path.isdir(directory):
        problem = "is not a directory" if os.path.exists(directory) else "does not exist"
        raise ConversionError(f"{directory}: {problem}; expected a Hugging Face model directory")
    path = os.path.join(directory, "config.json")
    if not os.path.isfile(path):
        raise ConversionError(f"{directory}: no config.json; expected a Hugging Face model directory")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: not valid JSON ({e})") from None


def rope_theta_of(config: Mapping, default: float = 10000.0) -> float:
    """``rope_theta`` from a transformers-4 (top level) or transformers-5 (``rope_parameters``) config."""
    params = config.get("rope_parameters") or {}
    if "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.get("rope_theta", default))


def rope_type_of(config: Mapping) -> str:
    """The RoPE variant; a non-default type in either the v5 or the v4 field wins."""
    for field in ("rope_parameters", "rope_scaling"):
        params = config.get(field) or {}
        kind = params.get("rope_type", params.get("type")) or "default"
        if kind != "default":
            return kind
    return "default"


class SafetensorsReader:
    """Lazy access to the tensors of a directory holding one or several safetensors files."""

    def __init__(self, directory: str):
        if not os.path.isdir(directory):
            raise ConversionError(f"{directory}: not a directory")
        self.directory = directory
        names = os.listdir(directory)
        index_path = os.path.join(directory, INDEX_FILE)
        if os.path.isfile(index_path):
            with open(index_path, encoding="utf-8") as f:
                weight_map = json.load(f).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ConversionError(f"{index_path}: has no 'weight_map' object")
            missing = sorted({v for v in weight_map.values() if not os.path.isfile(os.path.join(directory, v))})
            if missing:
                raise ConversionError(f"{index_path}: lists shard files that are absent: {', '.join(missing)}")
            self.location = dict(weight_map)
        else:
            files = sorted(n for n in names if n.endswith(".safetensors"))
            if not files:
                pickled = sorted(n for n in names if n.endswith(PICKLE_SUFFIXES))
                if pickled:
                    raise ConversionError(
                        f"{directory}: holds only pickled weights ({', '.join(pickled)}). Pickle files can execute "
                        "arbitrary code when loaded, so they are refused. Convert them to safetensors on a machine "
                        "you trust (transformers: model.save_pretrained(dir, safe_serialization=True)) and retry."
                    )
                raise ConversionError(f"{directory}: no *.safetensors weights found")
            self.location = {}
            for name in files:
                with safe_open(os.path.join(directory, name), framework="numpy") as f:
                    for key in f.keys():
                        self.location[key] = name
        self._handles: dict[str, object] = {}

    def keys(self) -> list[str]:
        return list(self.location)

    def __contains__(self, key: str) -> bool:
        return key in self.location

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._handle(key).get_slice(key).get_shape())

    def dtype(self, key: str) -> str:
        return self._handle(key).get_slice(key).get_dtype()

    def __getitem__(self, key: str) -> np.ndarray:
        return self._handle(key).get_tensor(key)

    def _handle(self, key: str):
        if key not in self.location:
            raise KeyError(key)
        name = self.location[key]
        if name not in self._handles:
            self._handles[name] = safe_open(os.path.join(self.directory, name), framework="numpy")
        return self._handles[name]


def write_safetensors(
    directory: str, tensors: Mapping[str, np.ndarray] | Iterable[tuple[str, np.ndarray]],
    max_shard_bytes: int = 5 * 2**30,
) -> list[str]:
    """Writes tensors as ``model.safetensors`` or as shards plus ``model.safetensors.index.json``.

    Each shard is written as soon as it is full, so at most one shard's tensors are held at a time.
    """
    os.makedirs(directory, exist_ok=True)
    meta = {"format": "pt"}  # transformers expects this tag
    written: list[tuple[str, list[str]]] = []  # (temporary file name, tensor names)
    shard: dict[str, np.ndarray] = {}
    size = total = 0

    def flush():
        name = f"shard-{len(written):05d}.partial"
        save_file(shard, os.path.join(directory, name), metadata=meta)
        written.append((name, list(shard)))

    for key, value in (tensors.items() if isinstance(tensors, Mapping) else tensors):
        value = np.ascontiguousarray(value)
        if shard and size + value.nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[key] = value
        size += value.nbytes
        total += value.nbytes
    flush()
    if len(written) == 1:
        os.replace(os.path.join(directory, written[0][0]), os.path.join(directory, SINGLE_FILE))
        return [SINGLE_FILE]
    names, weight_map = [], {}
    for i, (partial, keys) in enumerate(written):
        name = f"model-{i + 1:05d}-of-{len(written):05d}.safetensors"
        os.replace(os.path.join(directory, partial), os.path.join(directory, name))
        names.append(name)
        weight_map.update({k: name for k in keys})
    with open(os.path.join(directory, INDEX_FILE), "w", encoding="utf-8") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    return names
