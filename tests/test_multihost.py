"""Two local processes (jax.distributed on 127.0.0.1, 2 CPU devices each) train like one process."""
import json
import os
import socket
import subprocess
import sys

from wings_jax.data.demo import ensure_demo_dataset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO = os.path.join(ROOT, "configs", "demo.py")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, demo_data, steps, extra=()):
    return [sys.executable, "-m", "wings_jax.train", "--config", DEMO, "--workdir", workdir,
            f"--config.demo_data.dir={demo_data}", "--config.demo_data.num_records=128", "--config.data.max_len=64",
            "--config.train.loss_chunk=64", "--config.data.shuffle=false", "--config.train.log_every=1",
            f"--config.train.steps={steps}", "--config.checkpoint.every=3", "--config.mesh.data=2",
            "--config.mesh.fsdp=2", *extra]


def _run(commands, devices):
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
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
    # schedule follows train.steps, so the single-process run takes the same two legs).
    single = str(tmp_path / "single")
    for steps in (3, 4):
        _run([_command(single, demo_data, steps)], devices=4)

    multi = str(tmp_path / "multi")
    for steps in (3, 4):
        port = _free_port()
        outputs = _run([_command(multi, demo_data, steps, ("--coordinator_address", f"127.0.0.1:{port}",
                                                           "--num_processes", "2", "--process_id", str(i)))
                        for i in range(2)], devices=2)
    assert "resumed from step 3" in outputs[0]
    expected, got = _losses(single), _losses(multi)
    assert sorted(got) == [1, 2, 3, 4]
    for step in range(1, 5):
        assert abs(got[step] - expected[step]) < 1e-4, (step, got[step], expected[step])
