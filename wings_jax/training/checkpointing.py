"""Training checkpoints (orbax CheckpointManager) and pre-emption signals.

Layout: ``WORKDIR/checkpoints/<step>/{params, opt_state, extra}``; ``params`` holds every parameter
(trainable and frozen), so a step directory is a complete model for generation and evaluation.
Orbax writes each step under a temporary name and renames it when complete; on resume, a step that
cannot be restored (a half-written directory from a killed process) is skipped for the one before.
"""
from __future__ import annotations

import logging
import signal
from typing import Any

import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils
from etils import epath

from wings_jax.convert.checkpoint import CHECKPOINTS_DIR, PARAMS_ITEM

log = logging.getLogger("wings_jax.train")


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.directory = epath.Path(workdir) / CHECKPOINTS_DIR
        self.manager = ocp.CheckpointManager(self.directory, options=options,
                                             item_names=(PARAMS_ITEM, "opt_state", "extra"))

    def save(self, step: int, params: Any, opt_state: Any, extra: dict[str, Any]) -> None:
        self.manager.save(step, args=ocp.args.Composite(**{
            PARAMS_ITEM: ocp.args.StandardSave(params),
            "opt_state": ocp.args.StandardSave(opt_state),
            "extra": ocp.args.JsonSave(extra),
        }), force=True)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, params, opt_state, extra) of the newest restorable step, or None."""
        for step in sorted(self.manager.all_steps(), reverse=True):
            try:
                restored = self.manager.restore(step, args=ocp.args.Composite(**{
                    PARAMS_ITEM: ocp.args.StandardRestore(abstract_params),
                    "opt_state": ocp.args.StandardRestore(abstract_opt_state),
                    "extra": ocp.args.JsonRestore(),
                }))
            except Exception as e:  # noqa: BLE001 - any unreadable step falls back to an older one
                aside = self.directory / f"{step}.unrestorable"
                log.warning("checkpoint step %d cannot be restored (%s: %s); moved to %s, trying an older one",
                            step, type(e).__name__, str(e).splitlines()[0][:300], aside)
                self._move_aside(step, aside)
                continue
            return step, restored[PARAMS_ITEM], restored["opt_state"], restored["extra"]
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


class PreemptionGuard:
    """Turns the first SIGTERM / SIGINT into a request the loop honours after its current step
    (save, then exit); a second SIGINT interrupts at once."""

    def __init__(self):
        self.signal_name: str | None = None
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signal_name = signal.Signals(signum).name
        signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))

    @property
    def requested(self) -> bool:
        return self.signal_name is not None

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
