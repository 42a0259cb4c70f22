"""Training checkpoints (orbax CheckpointManager).

Layout: ``WORKDIR/checkpoints/<step>/{params, opt_state, extra, checksums}``; ``params`` holds every parameter
(trainable and frozen), so a step directory is a complete model for generation and evaluation; ``checksums``
records every saved array's checksum. Orbax writes each step under a temporary name and renames it when
complete; on resume, a damaged step (half-written by a killed process, or failing its checksums) is moved
aside for the one before (the routine generation and evaluation share, ``convert.checkpoint.restore_newest``).
"""
from __future__ import annotations

from typing import Any

import orbax.checkpoint as ocp

from wings_jax.convert.checkpoint import (  # noqa: F401 - CheckpointError: the error of a bad resume
    CHECKPOINTS_DIR, CHECKSUMS_ITEM, PARAMS_ITEM, CheckpointError, orbax_path, restore_newest, save_args,
)


class Checkpointer:
    def __init__(self, workdir: str, *, keep: int, async_save: bool):
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save, create=True)
        self.workdir = workdir
        self.manager = ocp.CheckpointManager(orbax_path(workdir) / CHECKPOINTS_DIR, options=options,
                                             item_names=(PARAMS_ITEM, "opt_state", "extra", CHECKSUMS_ITEM))

    def save(self, step: int, params: Any, opt_state: Any, extra: dict[str, Any]) -> None:
        args = save_args({PARAMS_ITEM: params, "opt_state": opt_state}, {"extra": extra})
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore_latest(self, abstract_params: Any, abstract_opt_state: Any) -> tuple[int, Any, Any, dict] | None:
        """(step, params, opt_state, extra) of the newest good step; None when there is no step.

        A damaged step (half-written by a killed process, truncated or overwritten files) is moved aside and
        the one before it is used (:func:`restore_newest`). A complete step written for another model or
        optimizer (the config changed) is an error: resuming from scratch would silently lose the run.
        """
        if not self.manager.all_steps():
            return None
        try:
            directory, restored = restore_newest(self.workdir, {PARAMS_ITEM: abstract_params,
                                                                "opt_state": abstract_opt_state, "extra": None})
        finally:
            self.manager.reload()  # steps may have been moved aside
        return int(directory.name), restored[PARAMS_ITEM], restored["opt_state"], restored["extra"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
