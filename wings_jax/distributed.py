"""Multi-process JAX start-up flags, shared by the programs that can run on several hosts (train, lm_eval)."""
from __future__ import annotations

import argparse

import jax

from wings_jax.config import ConfigError


def add_flags(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--distributed", action="store_true", help="jax.distributed.initialize() from the environment")
    parser.add_argument("--coordinator_address", help="HOST:PORT of process 0 (with --num_processes, --process_id)")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--process_id", type=int)
    return parser


def initialize(args: argparse.Namespace) -> None:
    """Joins the cluster the flags describe; nothing without them (one process)."""
    if not (args.coordinator_address or args.distributed):
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes (tests); no effect elsewhere
    if args.coordinator_address:
        if args.num_processes is None or args.process_id is None:
            raise ConfigError("--coordinator_address needs --num_processes and --process_id")
        jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    else:
        jax.distributed.initialize()  # TPU pods / SLURM: the environment describes the cluster
