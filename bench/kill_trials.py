"""Kill trials for README.md's reliability section: training killed at random moments, then resumed.

    python bench/kill_trials.py --trials 6            # ~1 min a trial on a 2-core CPU

One uninterrupted run of the tiny demo gives the reference losses. Each trial starts the same run in a
new workdir, sends SIGTERM or SIGKILL (alternating) at a random moment (start-up, training, checkpoint
saves alike), then reruns the same command until it completes. It counts the restarts, the checkpoints
found damaged (moved aside), the steps computed twice, and compares every step's loss with the
reference. Prints one Markdown table row per trial and a summary line.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")
STEPS = 24


def _command(workdir: str, demo_data: str) -> list[str]:
    overrides = [f"demo_data.dir={demo_data}", "demo_data.num_records=128", "data.max_len=64",
                 "train.loss_chunk=64", "train.log_every=1", f"train.steps={STEPS}", "checkpoint.every=3",
                 "checkpoint.keep=2"]
    return [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--workdir", workdir,
            *(f"--config.{o}" for o in overrides)]


def _losses(workdir: str) -> dict[int, list[float]]:
    """Every logged loss per step (a step computed twice after a restart appears twice)."""
    out: dict[int, list[float]] = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(path):
        for line in open(path):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line torn by SIGKILL: shows as a missing step if never rewritten
                continue
            if "loss" in record:
                out.setdefault(record["step"], []).append(record["loss"])
    return out


def _run(workdir: str, demo_data: str, kill_after: float | None, sig: int) -> tuple[int, str]:
    process = subprocess.Popen(_command(workdir, demo_data), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               text=True, cwd=ROOT)
    if kill_after is not None:
        try:
            process.wait(timeout=kill_after)
        except subprocess.TimeoutExpired:
            process.send_signal(sig)
    out, _ = process.communicate(timeout=600)
    return process.returncode, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    rng = random.Random(args.seed)
    root = tempfile.mkdtemp(prefix="kill_trials_")
    demo_data = os.path.join(root, "demo_data")

    start = time.perf_counter()
    code, out = _run(os.path.join(root, "reference"), demo_data, None, 0)
    if code != 0:
        sys.exit(f"the uninterrupted run failed (exit {code}):\n{out[-2000:]}")
    reference_s = time.perf_counter() - start
    reference = {step: losses[-1] for step, losses in _losses(os.path.join(root, "reference")).items()}

    print("| trial | signal | sent after | exit | restarts | damaged steps moved aside | steps redone | "
          "max abs loss diff vs uninterrupted |")
    print("|---|---|---|---|---|---|---|---|")
    totals = {"trials": 0, "damaged": 0, "unequal": 0, "incomplete": 0}
    for trial in range(args.trials):
        workdir = os.path.join(root, f"trial{trial}")
        sig = signal.SIGTERM if trial % 2 == 0 else signal.SIGKILL
        kill_after = rng.uniform(0.05, 1.0) * reference_s
        first_exit, _ = _run(workdir, demo_data, kill_after, sig)
        restarts = 0
        while restarts < 5:
            restarts += 1
            code, out = _run(workdir, demo_data, None, 0)
            if code == 0:
                break
        damaged = len(glob.glob(os.path.join(workdir, "checkpoints", "*.damaged")))
        logged = _losses(workdir)
        redone = sum(len(v) - 1 for v in logged.values())
        complete = code == 0 and sorted(logged) == sorted(reference)
        diff = max((abs(loss - reference[step]) for step, v in logged.items() for loss in v), default=float("nan"))
        totals["trials"] += 1
        totals["damaged"] += damaged
        totals["unequal"] += int(not diff <= 1e-6)
        totals["incomplete"] += int(not complete)
        print(f"| {trial} | {signal.Signals(sig).name} | {kill_after:.1f} s | {first_exit} | {restarts} | {damaged} | "
              f"{redone} | {diff:.2g}{'' if complete else ' (did not complete: ' + out[-300:] + ')'} |")
    print(f"\n{totals['trials']} trials, {STEPS} steps each (checkpoint every 3): {totals['incomplete']} did not "
          f"complete, {totals['unequal']} with losses differing from the uninterrupted run by more than 1e-6, "
          f"{totals['damaged']} damaged checkpoints moved aside; uninterrupted run {reference_s:.0f} s")


if __name__ == "__main__":
    main()
