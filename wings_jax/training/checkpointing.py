"""Training checkpoints (orbax CheckpointManager).

Layout: ``WORKDIR/checkpoints/<step>/{params, opt_state, extra}``; ``params`` holds every parameter
(trainable and frozen), so a step directory is a complete model for generation and evaluation.
Orbax writes each step under a temporary name and renames it when complete; on resume, a step that
cannot be restored (a half-written directory from a killed process) is skipped for the one before.
"""
from __future__ import annotations

import collections
import logging
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from wings_jax.convert.checkpoint import CHECKPOINTS_DIR, PARAMS_ITEM, orbax_path

log = logging.getLogger("wings_jax.train")


class CheckpointError(RuntimeError):
    """The workdir's checkpoints cannot be resumed; the message says why and what to do."""


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.directory = orbax_path(workdir) / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(PARAMS_ITEM, "opt_state", "extra"))

    def save(self, step: int, params: Any, opt_state: Any, extra: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "extra": ocp.args.JsonSave(extra),
        }), force=True)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, params, opt_state, extra) of the newest restorable step; None when there is no step.

        A step that cannot be read (half-written by a killed process, truncated files) is moved aside
        and the one before it is used. A complete step written for another model or optimizer (the
        config changed) is an error: resuming from scratch would silently lose the run.
        """
        expected = {PARAMS_ITEM: abstract_params, "opt_state": abstract_opt_state}
        moved = []
        for step in sorted(self.manager.all_steps(), reverse=True):
            mismatch = self._layout_mismatch(step, expected)
            if mismatch:
                raise CheckpointError(
                    f"checkpoint step {step} in {self.directory} was written for another model or optimizer "
                    f"({mismatch}). Did model.* or optim.groups change? Resume with the settings it was written "
                    "with, or train in a new workdir (init_from can start from its weights).")
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
                    "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                    "extra": ocp.args.JsonRestore(),
                }))
            except Exception as e:  # noqa: BLE001 - an unreadable step falls back to an older one
                aside = self.directory / f"{step}.unrestorable"
                log.warning("checkpoint step %d cannot be restored (%s: %s); moved to %s, trying an older one",
                            step, type(e).__name__, str(e).splitlines()[0][:300], aside)
                self._move_aside(step, aside)
                moved.append(step)
                continue
            return step, restored[PARAMS_ITEM], restored["opt_state"], restored["extra"]
        if moved:
            raise CheckpointError(f"no checkpoint in {self.directory} could be restored (steps {moved} were moved "
                                  "aside as unreadable); move them back to retry, or start in a new workdir")
        return None

    def _layout_mismatch(self, step: int, expected: dict[str, Any]) -> str | None:
        """What differs between a step's stored array shapes and the expected trees (None: same, or unreadable)."""
        for item, abstract in expected.items():
            try:
                metadata = ocp.StandardCheckpointer().metadata(self.directory / str(step) / item).item_metadata
            except Exception:  # noqa: BLE001 - unreadable metadata: an incomplete step, handled by restore
                return None
            stored = collections.Counter(tuple(a.shape) for a in jax.tree.leaves(getattr(metadata, "tree", metadata)))
            wanted = collections.Counter(tuple(a.shape) for a in jax.tree.leaves(abstract))
            if not stored:  # truncated or missing metadata: an incomplete step, handled by restore
                return None
            if stored != wanted:
                extra = sorted((stored - wanted).elements())[:3]
                missing = sorted((wanted - stored).elements())[:3]
                return (f"{item}: {sum(stored.values())} arrays stored, {sum(wanted.values())} expected; "
                        f"shapes only stored {extra}, only expected {missing}")
        return None

    def _move_aside(self, step: int, aside: epath.Path) -> None:
        """Renames a broken step so that neither resume nor a new save of that step trips over it."""
        if jax.process_index() == 0:
            if aside.exists():
                aside.rmtree()
            (self.directory / str(step)).rename(aside)
        multihost_utils.sync_global_devices(f"checkpoint {step} moved aside")
        self.manager.reload()

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
