"""Self-describing checkpoint directories.

A converted checkpoint is::

    CKPT/
      wings_config.json   {"format": ..., "model": WingsModelConfig, "metadata": {...}}  (written last)
      params/             orbax PyTree of the model's parameters (nested dict, '/'-paths as in params.py)
      checksums/          every saved array's checksum (:func:`checksums`), verified at restore
      tokenizer files     tokenizer.json, tokenizer_config.json, ...

A training workdir holds the same ``wings_config.json`` and tokenizer at its root and
``checkpoints/<step>/{params, checksums, ...}`` per saved step; :func:`load_model` accepts either and
:func:`restore_newest` is the one restore (with its fallback past damaged steps) of resume, generate and evaluate.
Training saves its steps (params / opt_state / extra / checksums) through :class:`Checkpointer`, an orbax
CheckpointManager: orbax writes each step under a temporary name and renames it when complete.
"""
from __future__ import annotations

import collections
import json
import logging
import os
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from wings_jax.data.tokenizer import copy_tokenizer_files
from wings_jax.model.runtime import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import abstract_model

FORMAT = "wings_jax/1"
CONFIG_FILE = "wings_config.json"
PARAMS_ITEM = "params"
CHECKPOINTS_DIR = "checkpoints"
OPT_STATE_ITEM = "opt_state"
EXTRA_ITEM = "extra"  # JSON, e.g. every process's data iterator state
CHECKSUMS_ITEM = "checksums"  # {"algorithm": ..., "items": {item: {array path: checksum}}}, see checksums()


class CheckpointError(ValueError):
    """A checkpoint that cannot be used (missing, damaged, or written for another model); the message says what
    to do."""


log = logging.getLogger("wings_jax.checkpoint")


# ---------------------------------------------------------------------------------------------
# Checksums of saved arrays, computed on the devices from the arrays themselves.
#
# An array's checksum is the sum (mod 2**32) over its elements of a hash of (flat index, bit pattern). Integer
# addition is exact and order-free, so the value does not depend on how the array is sharded or on how many
# processes save or restore it, and every process of a restore gets the same verdict (the sum is one global
# reduction). It costs one fused pass over device memory when a step is saved and when it is restored: no host
# copy and no reading the files back after orbax finalises them, so asynchronous saves stay asynchronous.

ALGORITHM = "wings_jax/sum32-murmur3/1"
_UINT = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}


def _mix(x: jax.Array) -> jax.Array:
    """murmur3's 32-bit finaliser: every input bit reaches every output bit."""
    x = x ^ (x >> 16)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def _array_checksum(x: jax.Array) -> jax.Array:
    x = jnp.asarray(x)
    bits = x.astype(jnp.uint32) if x.dtype == jnp.bool_ else jax.lax.bitcast_convert_type(x, _UINT[x.dtype.itemsize])
    index = jnp.zeros(x.shape, jnp.uint32)  # the flat index (mod 2**32): moved values change the sum too
    for axis, size in enumerate(x.shape):
        index = index * np.uint32(size) + jax.lax.broadcasted_iota(jnp.uint32, x.shape, axis)
    return jnp.sum(_mix(bits.astype(jnp.uint32) ^ _mix(index + np.uint32(0x9E3779B9))), dtype=jnp.uint32)


_leaf_checksums = jax.jit(lambda leaves: [_array_checksum(x) for x in leaves])


def path_name(path: tuple) -> str:
    """A PyTree key path as '/'-joined keys (``llm/layers/attn/q/kernel``)."""
    return "/".join(str(getattr(k, "key", getattr(k, "name", getattr(k, "idx", k)))) for k in path)


def checksums(tree: Any) -> dict[str, int]:
    """``{'/'-joined path: checksum}`` of every array of ``tree``."""
    named = jax.tree_util.tree_flatten_with_path(tree)[0]
    values = jax.device_get(_leaf_checksums([leaf for _, leaf in named]))
    return {path_name(path): int(value) for (path, _), value in zip(named, values)}


def mismatches(tree: Any, expected: Mapping[str, int]) -> list[str]:
    """Paths whose arrays differ from ``expected`` (present in only one of the two counts as differing)."""
    actual = checksums(tree)
    return sorted(k for k in actual.keys() | expected.keys() if actual.get(k) != expected.get(k))


# ---------------------------------------------------------------------------------------------
# Layout, save and restore


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


def start_workdir(workdir: str, cfg: WingsModelConfig, tokenizer_dir: str, init_from: str | None,
                  run_config: str) -> None:
    """Gives a new training workdir its tokenizer files and config (a workdir that has them is left as it is)."""
    if (epath.Path(workdir) / CONFIG_FILE).exists():
        return
    copy_tokenizer_files(tokenizer_dir, workdir)
    # what init_from knew about its weights (source dtype, layout details) stays true for the run's
    inherited = read_config(init_from)[1] if init_from else {}
    write_config(workdir, cfg, {**inherited, "source": "training", "init_from": init_from, "run_config": run_config})


def read_config(path: str) -> tuple[WingsModelConfig, dict[str, Any]]:
    file = epath.Path(path) / CONFIG_FILE
    if not file.exists():
        raise CheckpointError(
            f"{path}: no {CONFIG_FILE}; not a wings_jax checkpoint or training workdir "
            "(convert weights with `python -m wings_jax.convert import-hf ...` first)"
        )
    body = json.loads(file.read_text())
    if body.get("format") != FORMAT:
        raise CheckpointError(f"{file}: format {body.get('format')!r}, expected {FORMAT!r}")
    try:
        return WingsModelConfig.from_dict(body["model"]), body.get("metadata", {})
    except (TypeError, ValueError, KeyError) as e:
        raise CheckpointError(f"{file}: invalid model config ({e})") from None


def params_dict(model: nnx.Module) -> dict:
    return nnx.state(model, nnx.Param).to_pure_dict()


def save_model(
    path: str, model: WingsModel, *, tokenizer_src: str | None = None, metadata: Mapping[str, Any] | None = None
) -> None:
    """Writes a converted checkpoint; the config file comes last, so a crash leaves no valid-looking one."""
    directory = orbax_path(path)
    if (directory / CONFIG_FILE).exists() or (directory / PARAMS_ITEM).exists():
        raise CheckpointError(f"{path}: already holds a checkpoint; choose a new output directory")
    directory.mkdir(parents=True, exist_ok=True)
    for item, args in save_args({PARAMS_ITEM: params_dict(model)}).items():
        checkpointer = ocp.Checkpointer(ocp.JsonCheckpointHandler() if isinstance(args, ocp.args.JsonSave)
                                        else ocp.StandardCheckpointHandler())
        checkpointer.save(directory / item, args=args)
    if tokenizer_src:
        copy_tokenizer_files(tokenizer_src, str(directory))
    write_config(str(directory), model.cfg, metadata)


def save_args(arrays: Mapping[str, Any], json_items: Mapping[str, dict] | None = None) -> dict[str, Any]:
    """orbax save arguments of each item (``arrays``: PyTrees of arrays; ``json_items``: JSON dicts) plus
    the :data:`CHECKSUMS_ITEM` recording every array's checksum."""
    args = {name: ocp.args.StandardSave(tree) for name, tree in arrays.items()}
    args.update({name: ocp.args.JsonSave(value) for name, value in (json_items or {}).items()})
    recorded = {name: checksums(tree) for name, tree in arrays.items()}
    args[CHECKSUMS_ITEM] = ocp.args.JsonSave({"algorithm": ALGORITHM, "items": recorded})
    return args


def step_dirs(path: str) -> list[epath.Path]:
    """The directories holding parameters, newest first: a converted checkpoint itself, or a training
    workdir's complete steps (orbax writes under a temporary name and renames: only digit names are complete)."""
    directory = orbax_path(path)
    if (directory / PARAMS_ITEM).exists():
        return [directory]
    root = directory / CHECKPOINTS_DIR
    steps = sorted((int(c.name) for c in root.iterdir() if c.name.isdigit() and (c / PARAMS_ITEM).exists())
                   if root.exists() else (), reverse=True)
    if not steps:
        raise CheckpointError(f"{path}: holds no parameters (neither {PARAMS_ITEM}/ nor a complete "
                              f"{CHECKPOINTS_DIR}/<step>/)")
    return [root / str(step) for step in steps]


def _layout_mismatch(directory: epath.Path, targets: Mapping[str, Any]) -> str | None:
    """What differs between the stored array shapes and the targets' (None: the same, or unreadable)."""
    for item, abstract in targets.items():
        if abstract is None:
            continue
        try:
            metadata = ocp.StandardCheckpointHandler().metadata(directory / item)
        except Exception:  # noqa: BLE001 - unreadable metadata: a damaged step, handled by the restore
            return None
        stored = collections.Counter(tuple(a.shape) for a in jax.tree.leaves(getattr(metadata, "tree", metadata)))
        wanted = collections.Counter(tuple(a.shape) for a in jax.tree.leaves(abstract))
        if not stored:  # truncated or missing metadata: a damaged step, handled by the restore
            return None
        if stored != wanted:
            extra, missing = sorted((stored - wanted).elements())[:3], sorted((wanted - stored).elements())[:3]
            return (f"{item}: {sum(stored.values())} arrays stored, {sum(wanted.values())} expected; "
                    f"shapes only stored {extra}, only expected {missing}")
        if isinstance(abstract, dict):  # nested dicts (the parameters) are stored as such: names must match too
            stored_names, wanted_names = _names(getattr(metadata, "tree", metadata)), _names(abstract)
            if stored_names != wanted_names:
                return (f"{item}: arrays only stored {sorted(stored_names - wanted_names)[:3]}, only expected "
                        f"{sorted(wanted_names - stored_names)[:3]}")
    return None


def _names(tree: Any) -> set[str]:
    return {path_name(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _restore_verified(directory: epath.Path, targets: Mapping[str, Any]) -> dict[str, Any]:
    """Each item of ``targets`` (abstract arrays, or None for a JSON item) restored from ``directory`` and
    checked against the recorded checksums; raises :class:`CheckpointError` naming the file or arrays at fault."""
    recorded_file = directory / CHECKSUMS_ITEM
    has_checksums = recorded_file.exists()
    restored, error = {}, None
    for item, abstract in {**targets, **({CHECKSUMS_ITEM: None} if has_checksums else {})}.items():
        try:
            restored[item] = _read_item(directory / item, abstract)
        except Exception as e:  # noqa: BLE001 - orbax and tensorstore raise bare Exceptions on unreadable files
            first_line = (str(e).splitlines() or [""])[0][:300]
            error = f"{directory / item} cannot be read ({type(e).__name__}: {first_line})"
            break
    recorded = restored.pop(CHECKSUMS_ITEM, None)
    if error is None and has_checksums and not (isinstance(recorded, dict) and recorded.get("algorithm") == ALGORITHM):
        error = f"{recorded_file}: not checksums of algorithm {ALGORITHM!r}"
    if _on_any_process(error is not None):  # each process reads its own shards: all must agree to go on
        raise CheckpointError(error or f"{directory}: another process could not read its part")
    if recorded is None:
        log.warning("%s has no checksums (written before they were recorded); loaded unverified", directory)
        return restored
    for item, abstract in targets.items():
        if abstract is not None:
            bad = mismatches(restored[item], recorded.get("items", {}).get(item, {}))
            if bad:
                raise CheckpointError(f"{directory / item}: {len(bad)} arrays differ from their recorded checksums "
                                      f"({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''})")
    return {item: value if targets[item] is None else _cast(value, targets[item]) for item, value in restored.items()}


def _read_item(directory: epath.Path, abstract: Any) -> Any:
    """One item: a PyTree laid out as ``abstract`` (abstract arrays) in the dtypes it was saved in (what its
    checksums are of), or a JSON dict when ``abstract`` is None."""
    if abstract is None:
        return ocp.JsonCheckpointHandler().restore(directory, args=ocp.args.JsonRestore())
    handler = ocp.StandardCheckpointHandler()
    return handler.restore(directory, args=ocp.args.StandardRestore(_as_stored(abstract, handler.metadata(directory))))


def _as_stored(abstract: Any, metadata: Any) -> Any:
    """``abstract`` with each array's dtype as saved. The metadata tree holds the saved leaves in the order
    ``abstract`` flattens to (its containers as plain lists and dicts, so only the leaves are compared)."""
    leaves, treedef = jax.tree.flatten(abstract)
    stored = jax.tree.leaves(getattr(metadata, "tree", None), is_leaf=lambda x: hasattr(x, "dtype"))
    if len(stored) != len(leaves) or any(tuple(m.shape) != tuple(a.shape) for a, m in zip(leaves, stored)):
        return abstract  # another layout: the restore itself reports it
    return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(a.shape, m.dtype, sharding=a.sharding)
                                        for a, m in zip(leaves, stored)])


def _cast(tree: Any, abstract: Any) -> Any:
    """The restored arrays in the dtypes asked for (e.g. a float32 checkpoint loaded for bfloat16 inference)."""
    return jax.tree.map(lambda x, a: x if x.dtype == a.dtype else x.astype(a.dtype), tree, abstract)


def _on_any_process(flag: bool) -> bool:
    if jax.process_count() == 1:
        return flag
    return bool(multihost_utils.process_allgather(np.int32(flag)).any())


def restore_newest(path: str, targets: Mapping[str, Any]) -> tuple[epath.Path, dict[str, Any]]:
    """The newest step of a workdir (or the converted checkpoint) whose items restore and verify.

    ``targets`` maps item names to abstract arrays (``jax.ShapeDtypeStruct`` with shardings) or None (JSON).
    A damaged step (unreadable, or failing its checksums) is moved aside to ``<step>.damaged`` with a warning
    naming it and the file, and the one before it is used; a damaged converted checkpoint, or a step written
    for another model, is an error.
    """
    candidates = step_dirs(path)
    moved = []
    for directory in candidates:
        is_step = directory.parent.name == CHECKPOINTS_DIR
        mismatch = _layout_mismatch(directory, targets)
        if mismatch:
            where = f"checkpoint step {directory.name} in {directory.parent}" if is_step else str(directory)
            raise CheckpointError(
                f"{where} was written for another model or optimizer ({mismatch}). Did model.* or optim.groups "
                "change? Use it with the settings it was written with, or train in a new workdir (init_from can "
                "start from its weights).")
        try:
            return directory, _restore_verified(directory, targets)
        except CheckpointError as e:
            if not is_step:
                raise CheckpointError(f"{e}; the checkpoint is damaged: convert or copy it again") from None
            aside = directory.parent / f"{directory.name}.damaged"
            log.warning("checkpoint step %s is damaged: %s; moved to %s, trying an older one", directory.name, e, aside)
            _move_aside(directory, aside)
            moved.append(directory.name)
    raise CheckpointError(f"no checkpoint in {candidates[0].parent} could be restored (steps {', '.join(moved)} "
                          "were moved aside as damaged); move them back to retry, or start in a new workdir")


def _move_aside(directory: epath.Path, aside: epath.Path) -> None:
    """Renames a damaged step so that neither a restore nor a new save of that step trips over it."""
    if jax.process_index() == 0:
        if aside.exists():
            aside.rmtree()
        directory.rename(aside)
    multihost_utils.sync_global_devices(f"checkpoint {directory.name} moved aside")


def restore_params(path: str, target: Any) -> dict:
    """The parameters of a converted checkpoint or of a workdir's newest good step, restored into ``target``
    (a pure dict of ``jax.ShapeDtypeStruct`` with shardings) and verified."""
    return restore_newest(path, {PARAMS_ITEM: target})[1][PARAMS_ITEM]


def load_model(
    path: str,
    runtime: Runtime = Runtime(),
    *,
    shardings_fn: Callable[[nnx.State], Any] | None = None,
) -> tuple[WingsModel, dict[str, Any]]:
    """Loads a converted checkpoint or the newest step of a training workdir.

    ``shardings_fn`` maps the abstract parameter state to shardings (default: the first device).
    """
    cfg, metadata = read_config(path)

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
    return nnx.merge(graphdef, restore_params(path, target)), metadata


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.workdir = workdir
        self.manager = ocp.CheckpointManager(orbax_path(workdir) / CHECKPOINTS_DIR, options=options,
                                             item_names=(PARAMS_ITEM, OPT_STATE_ITEM, EXTRA_ITEM, CHECKSUMS_ITEM))

    def save(self, step: int, params: Any, opt_state: Any, extra: dict[str, Any]) -> None:
        args = save_args({PARAMS_ITEM: params, OPT_STATE_ITEM: opt_state}, {EXTRA_ITEM: extra})
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_newest(self, abstract_params: Any, abstract_opt_state: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, params, opt_state, extra) of the newest good step; None when there is no step.

        A damaged step (half-written by a killed process, truncated or overwritten files) is moved aside and
        the one before it is used (:func:`restore_newest`). A complete step written for another model or
        optimizer (the config changed) is an error: resuming from scratch would silently lose the run.
        """
        if not self.manager.all_steps():
            return None
        try:
            directory, restored = restore_newest(self.workdir, {PARAMS_ITEM: abstract_params,
                                                                OPT_STATE_ITEM: abstract_opt_state, EXTRA_ITEM: None})
        finally:
            self.manager.reload()  # steps may have been moved aside
        return int(directory.name), restored[PARAMS_ITEM], restored[OPT_STATE_ITEM], restored[EXTRA_ITEM]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
