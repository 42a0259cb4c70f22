"""Compile-ahead sweeps: the train step of one or more configs for several TPU slices, meshes and remat policies.

    python bench/compile_plan.py --out /tmp/plans.jsonl --jobs 2 --timeout 1200 \\
        --config configs/finetune.py \\
        --topology v5p-8 v5p-16 --mesh fsdp=-1 --remat full dots

Every combination of --config x --topology x --mesh x --remat x --grad_accum is
compiled in its own process (``wings_jax.aot.compile_only``, libtpu needed for TPU slices), at most
--jobs at once, each killed after --timeout seconds. One JSON line per combination is appended to
--out: the report of ``compile_only`` (or the error), the command line that reproduces it, and the
wall time. A full-size compile (Qwen1.5-7B + so400m) takes 3 to 6 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import itertools
import json
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor


def _one(config: str, topology: str, overrides: list[str]) -> dict:
    """Runs in the child process: compiles one combination and returns its report."""
    from wings_jax import aot
    from wings_jax.config import load_config

    return aot.compile_only(load_config(config, overrides), topology=topology)


def _command(config: str, topology: str, overrides: list[str]) -> str:
    flags = " ".join(f"--config.{o}" for o in overrides)
    return f"python -m wings_jax.train --config {config} --compile_only --topology {topology} {flags}".strip()


def _run(config: str, topology: str, overrides: list[str], timeout: float) -> dict:
    child = [sys.executable, __file__, "--child", json.dumps([config, topology, overrides])]
    tick = time.perf_counter()
    row = {"config": config, "topology": topology, "overrides": overrides,
           "command": _command(config, topology, overrides)}
    try:
        done = subprocess.run(child, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {**row, "error": f"timed out after {timeout:.0f} s", "wall_seconds": time.perf_counter() - tick}
    row["wall_seconds"] = time.perf_counter() - tick
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {**row, "error": f"exit {done.returncode}: {done.stderr.strip().splitlines()[-1:] or ['']}"}
    return {**row, "report": json.loads(lines[-1])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--config", nargs="+", default=[])
    parser.add_argument("--topology", nargs="+", default=[])
    parser.add_argument("--mesh", nargs="+", default=["fsdp=-1"],
                        help="mesh axis sizes such as fsdp=-1 or data=2,fsdp=-1 (unnamed axes are 1, one may be -1)")
    parser.add_argument("--remat", nargs="+", default=["full"])
    parser.add_argument("--grad_accum", nargs="+", type=int, default=[1])
    parser.add_argument("--set", nargs="*", default=[], help="further config overrides key=value for every run")
    parser.add_argument("--out", default="compile_plans.jsonl")
    parser.add_argument("--jobs", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=1200)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_one(*json.loads(args.child)), default=str))
        return
    runs = []
    for config, topology, mesh, remat, accum in itertools.product(
            args.config, args.topology, args.mesh, args.remat, args.grad_accum):
        sizes = {"data": "1", "fsdp": "1", "tensor": "1", **dict(item.split("=") for item in mesh.split(","))}
        overrides = [*(f"mesh.{axis}={size}" for axis, size in sizes.items()), f"runtime.remat={remat}",
                     f"train.grad_accum={accum}", *args.set]
        runs.append((config, topology, overrides))
    with ThreadPoolExecutor(args.jobs) as pool, open(args.out, "a") as out:
        for row in pool.map(lambda r: _run(*r, timeout=args.timeout), runs):
            out.write(json.dumps(row) + "\n")
            out.flush()
            report = row.get("report") or {}
            total = report.get("total_bytes")
            summary = row.get("error") or (
                f"{'?' if total is None else f'{total / 2**30:.1f}'} GiB/chip fits={report['fits']} "
                f"step={report['estimated_step_seconds']} mfu={report['mfu']}")
            print(f"[{row['wall_seconds']:.0f}s] {row['command']}\n    {summary}", flush=True)


if __name__ == "__main__":
    main()
