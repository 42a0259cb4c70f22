"""Damaged checkpoints: what each kind of damage leads to, and what checksumming costs at save time.

    python bench/checkpoint_damage.py [--size-mb 256]

Each trial writes a tiny Wings model's checkpoint (a training workdir with steps 1 and 2, or a converted
checkpoint), damages it one way and restores it with the routine training resume, generate and evaluate share
(``wings_jax.checkpoint.restore_newest``); it prints one Markdown table row per kind. Then it times the
checksums of ``--size-mb`` of float32 arrays against a synchronous orbax save of the same arrays.
Bounded: about a minute on a 2-core CPU.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wings_jax.checkpoint import (
    CHECKPOINTS_DIR, CHECKSUMS_ITEM, PARAMS_ITEM, CheckpointError, Checkpointer, checksums, params_dict, restore_newest,
    save_model,
)
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig

TINY = WingsModelConfig(llm=QwenConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2,
                                       num_heads=4, num_kv_heads=2), vision=None, wings=WingsConfig())


def _files(directory: str) -> list[str]:
    return sorted(os.path.join(r, n) for r, _, names in os.walk(directory) for n in names)


def overwrite(directory: str) -> None:
    """16 bytes in the middle of the largest file inverted (same size)."""
    target = max(_files(directory), key=os.path.getsize)
    with open(target, "r+b") as f:
        f.seek(os.path.getsize(target) // 2)
        old = f.read(16)
        f.seek(os.path.getsize(target) // 2)
        f.write(bytes(b ^ 0xFF for b in old))


def truncate(directory: str) -> None:
    for name in _files(directory):
        open(name, "wb").close()


def delete_largest(directory: str) -> None:
    os.remove(max(_files(directory), key=os.path.getsize))


def garble_json(directory: str) -> None:
    for name in _files(directory):
        if os.path.basename(name) == "metadata":
            open(name, "w").write('{"step": 2, "data": [')


# (kind, where in the newest step, damage)
STEP_DAMAGE = [
    ("params: bytes overwritten, same size", PARAMS_ITEM, overwrite),
    ("params: every file emptied (killed mid-write)", PARAMS_ITEM, truncate),
    ("params: largest data file deleted", PARAMS_ITEM, delete_largest),
    ("opt_state: bytes overwritten, same size", "opt_state", overwrite),
    ("opt_state: item directory deleted", "opt_state", shutil.rmtree),
    ("extra (data-iterator state): invalid JSON", "extra", garble_json),
    ("checksums: invalid JSON", CHECKSUMS_ITEM, garble_json),
    ("checksums: item deleted (a step written before checksums)", CHECKSUMS_ITEM, shutil.rmtree),
]


def _targets(params, opt_state):
    abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), (params, opt_state))
    return {PARAMS_ITEM: abstract[0], "opt_state": abstract[1], "extra": None}


def _outcome(path: str, targets, records: list[str]) -> str:
    records.clear()
    try:
        directory, _ = restore_newest(path, targets)
        used = f"step {directory.name} used" if directory.parent.name == CHECKPOINTS_DIR else "loaded"
    except CheckpointError as e:
        used = f"refused: `{str(e).splitlines()[0][:90]}...`"
    notes = [r for r in records if "moved to" in r or "no checksums" in r]
    said = ("moved aside, warning names " + notes[0].split(": ", 1)[1].split(" (")[0].split("; moved")[0]
            if notes and "moved to" in notes[0] else "note: no checksums, loaded unverified" if notes else "")
    return f"{used}; {said}" if said else used


def damage_table(root: str) -> list[str]:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    logging.getLogger("wings_jax.checkpoint").addHandler(Keep())
    logging.getLogger("wings_jax.checkpoint").propagate = False
    params = params_dict(WingsModel(TINY, Runtime(), rngs=nnx.Rngs(0)))
    opt_state = {"mu": jax.tree.map(jnp.zeros_like, params), "count": jnp.int32(0)}
    rows = ["| damage to the newest of two training steps | outcome (resume, generate, evaluate alike) |",
            "|---|---|"]
    for kind, item, damage in STEP_DAMAGE:
        workdir = tempfile.mkdtemp(dir=root)
        ckpt = Checkpointer(workdir, keep=5, async_save=True)
        for step in (1, 2):
            ckpt.save(step, params, opt_state, {"step": step})
        ckpt.close()
        damage(os.path.join(workdir, CHECKPOINTS_DIR, "2", item))
        rows.append(f"| {kind} | {_outcome(workdir, _targets(params, opt_state), records).replace(workdir, 'RUN')} |")
    workdir = tempfile.mkdtemp(dir=root)
    ckpt = Checkpointer(workdir, keep=5, async_save=False)
    ckpt.save(1, params, opt_state, {"step": 1})
    ckpt.close()
    overwrite(os.path.join(workdir, CHECKPOINTS_DIR, "1", PARAMS_ITEM))
    rows.append(f"| the only step: params bytes overwritten | "
                f"{_outcome(workdir, _targets(params, opt_state), records).replace(workdir, 'RUN')} |")
    for kind, damage in (("converted checkpoint: params bytes overwritten", overwrite),
                         ("converted checkpoint: checksums deleted (written before checksums)", None)):
        converted = os.path.join(tempfile.mkdtemp(dir=root), "ckpt")
        save_model(converted, WingsModel(TINY, Runtime(), rngs=nnx.Rngs(0)))
        if damage is None:
            shutil.rmtree(os.path.join(converted, CHECKSUMS_ITEM))
        else:
            damage(os.path.join(converted, PARAMS_ITEM))
        outcome = _outcome(converted, {PARAMS_ITEM: _targets(params, opt_state)[PARAMS_ITEM]}, records)
        rows.append(f"| {kind} | {outcome.replace(converted, 'CKPT')} |")
    return rows


def checksum_cost(root: str, size_mb: int) -> dict:
    arrays = {f"a{i}": jnp.asarray(np.random.RandomState(i).randn(size_mb * 2**20 // 4 // 16).astype(np.float32))
              for i in range(16)}
    jax.block_until_ready(arrays)
    checksums(arrays)  # compile
    tick = time.perf_counter()
    checksums(arrays)
    hashing = time.perf_counter() - tick
    ckpt = Checkpointer(os.path.join(root, "cost"), keep=5, async_save=False)
    ckpt.save(1, arrays, {"count": jnp.int32(0)}, {"step": 1})  # the first save also builds orbax's machinery
    tick = time.perf_counter()
    ckpt.save(2, arrays, {"count": jnp.int32(0)}, {"step": 2})
    ckpt.wait()
    saving = time.perf_counter() - tick
    ckpt.close()
    return {"size_mb": size_mb, "checksum_s": round(hashing, 3), "save_s_with_checksums": round(saving, 3),
            "checksum_share": round(hashing / saving, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size-mb", type=int, default=256)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        print("\n".join(damage_table(root)))
        print(json.dumps(checksum_cost(root, args.size_mb)))


if __name__ == "__main__":
    main()
