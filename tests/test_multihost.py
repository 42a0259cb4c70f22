"""Two local processes (jax.distributed on 127.0.0.1, 2 CPU devices each) train like one process."""
import json
import os
import subprocess
import sys

import jax

from jax_env import xla_flags
from wings_jax import sharding
from wings_jax.config import load_config
from wings_jax.checkpoint import CHECKPOINTS_DIR, CHECKSUMS_ITEM, load_model
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.training.loop import train
from local_ports import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _overrides(demo_data, steps):
    return [f"demo_data.dir={demo_data}", "demo_data.num_records=128", "data.max_len=64", "train.loss_chunk=64",
            "data.shuffle=false", "train.log_every=1", f"train.steps={steps}", "checkpoint.every=3", "mesh.data=2",
            "mesh.fsdp=2"]


def _command(workdir, demo_data, steps, extra=()):
    return [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--workdir", workdir,
            *(f"--config.{o}" for o in _overrides(demo_data, steps)), *extra]


def _run(commands, devices):
    env = {**os.environ, "XLA_FLAGS": xla_flags(devices)}
    processes = [subprocess.Popen(c, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for c in commands]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for p, out in zip(processes, outputs):
        assert p.returncode == 0, out
    return outputs


def _losses(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_two_processes_match_one(tmp_path):
    demo_data = str(tmp_path / "data")
    ensure_demo_dataset(demo_data, num_records=128)
    # Both runs: 3 steps and a checkpoint, then a restart that restores it and goes on (the learning-rate
    # schedule follows train.steps, so the single-process run takes the same two legs). The
    # single-process run is this process, on 4 of its devices.
    single = str(tmp_path / "single")
    mesh = sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4])
    for steps in (3, 4):
        train(load_config(DEMO, _overrides(demo_data, steps)), single, mesh=mesh)

    multi = str(tmp_path / "multi")
    for steps in (3, 4):
        port = free_port()
        outputs = _run([_command(multi, demo_data, steps, ("--coordinator_address", f"127.0.0.1:{port}",
                                                           "--num_processes", "2", "--process_id", str(i)))
                        for i in range(2)], devices=2)
    assert "resumed from step 3" in outputs[0]
    expected, got = _losses(single), _losses(multi)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
    # the checksums the two processes recorded verify in one process on one device (they do not depend on the
    # process count or the sharding): restoring their step uses it, moving nothing aside
    steps = os.path.join(multi, CHECKPOINTS_DIR)
    assert os.path.isdir(os.path.join(steps, "4", CHECKSUMS_ITEM))
    load_model(multi)
    assert sorted(os.listdir(steps)) == ["3", "4"]
