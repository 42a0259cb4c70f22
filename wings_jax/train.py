"""Training entry point.

    python -m wings_jax.train [--config configs/demo.py] [--config.key=value ...] [--workdir DIR]
        [--distributed | --coordinator_address HOST:PORT --num_processes N --process_id I]

Without ``--config`` it runs the built-in tiny demo (configs/demo.py) on whatever devices are present.
A run resumes from the newest complete checkpoint in its workdir; ``init_from`` starts a new run from
a converted checkpoint. SIGTERM / SIGINT save a checkpoint and exit (pre-emption).
"""
from __future__ import annotations

from wings_jax.training.preemption import PreemptionGuard

# Run as a program, the guard is installed before the heavy imports below (several seconds): a SIGTERM
# during start-up then ends the run as one during training does (exit 143, nothing half-written).
_STARTUP_GUARD = PreemptionGuard() if __name__ == "__main__" else None

import argparse  # noqa: E402 - after the guard
import logging
import os
import signal
import sys
from typing import Sequence

from wings_jax import aot, distributed
from wings_jax.config import ConfigError, parse_command_line
from wings_jax.checkpoint import CheckpointError
from wings_jax.training.loop import TrainingError, train

DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


def _log_to_stderr() -> None:
    """wings_jax's own log lines on stderr (libraries may have configured the root logger already)."""
    logger = logging.getLogger("wings_jax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    guard = _STARTUP_GUARD or PreemptionGuard()  # first: a signal from here on is a clean stop
    try:
        return _main(sys.argv[1:] if argv is None else list(argv), guard)
    finally:
        guard.restore()


def _exit_status(signal_name: str) -> int:
    return 128 + signal.Signals[signal_name].value


def _main(argv: list[str], guard: PreemptionGuard) -> int:
    _log_to_stderr()
    try:
        cfg, path, rest = parse_command_line(argv, default=DEFAULT_CONFIG)
        parser = argparse.ArgumentParser(prog="python -m wings_jax.train", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--workdir", help="default: runs/<config name>")
        distributed.add_flags(parser)
        parser.add_argument("--compile_only", action="store_true",
                            help="compile the train step and print its memory and cost, without training")
        parser.add_argument("--topology", help="with --compile_only: a TPU slice such as v5p-64 or v5e-16, "
                                               "compiled for on this machine (needs libtpu)")
        args = parser.parse_args(rest)
        if args.topology and not args.compile_only:
            raise ConfigError("--topology only makes sense with --compile_only")
        workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path.split(":")[0]))[0])
        if args.compile_only:
            report = aot.compile_only(cfg, topology=args.topology)
            print(aot.format_report(report))
            return 0 if report["fits"] else 3
        if guard.requested:
            print(f"{guard.signal_name} during start-up: stopped before training; nothing written", file=sys.stderr)
            return _exit_status(guard.signal_name)
        distributed.initialize(args)
        result = train(cfg, workdir, guard=guard)
    except (ConfigError, TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["ended"] != "completed":
        return _exit_status(result["ended"])
    print(f"training finished at step {result['step']}; checkpoints in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
