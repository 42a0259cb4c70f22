"""Self-describing checkpoint directories.

A converted checkpoint is::

    CKPT/
      wings_config.json   {"format": ..., "model": WingsModelConfig, "metadata": {...}}  (written last)
      params/             orbax PyTree of the model's parameters (nested dict, '/'-paths as in params.py)
      tokenizer files     tokenizer.json, tokenizer_config.json, ...

A training workdir holds the same ``wings_config.json`` and tokenizer at its root and
``checkpoints/<step>/params`` per saved step; :func:`load_model` accepts either.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, Mapping

import jax
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from wings_jax.convert.hf_io import ConversionError, copy_tokenizer_files
from wings_jax.model.qwen import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import abstract_model

FORMAT = "wings_jax/1"
CONFIG_FILE = "wings_config.json"
PARAMS_ITEM = "params"
CHECKPOINTS_DIR = "checkpoints"


def orbax_path(path: str | os.PathLike) -> epath.Path:
    """``path`` as orbax takes it: local paths made absolute (orbax refuses relative ones), gs:// as is."""
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.abspath(path))


def write_config(path: str, cfg: WingsModelConfig, metadata: Mapping[str, Any] | None = None) -> None:
    directory = epath.Path(path)
    directory.mkdir(parents=True, exist_ok=True)
    body = {"format": FORMAT, "model": cfg.to_dict(), "metadata": dict(metadata or {})}
    tmp = directory / (CONFIG_FILE + ".tmp")
    tmp.write_text(json.dumps(body, indent=2))
    tmp.rename(directory / CONFIG_FILE)


def read_config(path: str) -> tuple[WingsModelConfig, dict[str, Any]]:
    file = epath.Path(path) / CONFIG_FILE
    if not file.exists():
        raise ConversionError(
            f"{path}: no {CONFIG_FILE}; not a wings_jax checkpoint or training workdir "
            "(convert weights with `python -m wings_jax.convert import-hf ...` first)"
        )
    body = json.loads(file.read_text())
    if body.get("format") != FORMAT:
        raise ConversionError(f"{file}: format {body.get('format')!r}, expected {FORMAT!r}")
    try:
        return WingsModelConfig.from_dict(body["model"]), body.get("metadata", {})
    except (TypeError, ValueError, KeyError) as e:
        raise ConversionError(f"{file}: invalid model config ({e})") from None


def params_dict(model: nnx.Module) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def save_model(
    path: str, model: WingsModel, *, tokenizer_src: str | None = None, metadata: Mapping[str, Any] | None = None
) -> None:
    """Writes a converted checkpoint; the config file comes last, so a crash leaves no valid-looking one."""
    directory = epath.Path(path)
    if (directory / CONFIG_FILE).exists() or (directory / PARAMS_ITEM).exists():
        raise ConversionError(f"{path}: already holds a checkpoint; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(orbax_path(directory / PARAMS_ITEM), params_dict(model))
    checkpointer.wait_until_finished()
    if tokenizer_src:
        copy_tokenizer_files(tokenizer_src, str(directory))
    write_config(str(directory), model.cfg, metadata)


def latest_params_dir(path: str) -> epath.Path:
    """``path/params`` of a converted checkpoint, or the newest complete step of a training workdir."""
    directory = epath.Path(path)
    if (directory / PARAMS_ITEM).exists():
        return directory / PARAMS_ITEM
    root = directory / CHECKPOINTS_DIR
    steps = []
    if root.exists():
        for child in root.iterdir():
            # orbax writes into a temporary name and renames on success: only digit names are complete
            if child.name.isdigit() and (child / PARAMS_ITEM).exists():
                steps.append(int(child.name))
    if not steps:
        raise ConversionError(f"{path}: holds no parameters (neither {PARAMS_ITEM}/ nor a complete {CHECKPOINTS_DIR}/<step>/)")
    return root / str(max(steps)) / PARAMS_ITEM


def restore_params(params_dir: epath.Path, target: Any) -> dict:
    """Restores a params PyTree into ``target``: a pure dict of ``jax.ShapeDtypeStruct`` with shardings."""
    try:
        return ocp.StandardCheckpointer().restore(orbax_path(params_dir), target)
    except (ValueError, KeyError) as e:
        raise ConversionError(f"{params_dir}: cannot restore the parameters into the model described by its "
                              f"config ({e})") from None


def load_model(
    path: str,
    runtime: Runtime = Runtime(),
    *,
    override: Callable[[WingsModelConfig], WingsModelConfig] | None = None,
    shardings_fn: Callable[[nnx.State], Any] | None = None,
) -> tuple[WingsModel, dict[str, Any]]:
    """Loads a converted checkpoint or the newest step of a training workdir.

    ``override`` may adjust the stored model config (e.g. the stage or mixing); ``shardings_fn``
    maps the abstract parameter state to shardings (default: the first device).
    """
    cfg, metadata = read_config(path)
    if override is not None:
        cfg = override(cfg)

    def make(rngs):
        return WingsModel(cfg, runtime, rngs=rngs)

    graphdef, params = nnx.split(abstract_model(make))  # the model holds parameters only
    if shardings_fn is None:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, params.to_pure_dict())
    else:
        shardings = shardings_fn(params)
    target = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), params.to_pure_dict(),
                          shardings)
    restored = restore_params(latest_params_dir(path), target)
    return nnx.merge(graphdef, restored), metadata
