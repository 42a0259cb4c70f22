"""bench/gpu_suite.sh stays runnable: valid bash, and every train-step command's arguments parse."""
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "gpu_suite.sh"


def _commands(script: str) -> list[list[str]]:
    return [shlex.split(line)[1:] for line in SUITE.read_text().splitlines()
            if line.startswith("run python3 bench/") and script in line]


def test_gpu_suite_is_valid_bash():
    subprocess.run(["bash", "-n", str(SUITE)], check=True)


def test_gpu_suite_train_step_commands_parse():
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step

    commands = _commands("train_step.py")
    assert commands
    for command in commands:
        args = train_step.parse_args(command[2:])
        assert args.preset in train_step.PRESETS


def test_gpu_suite_scripts_exist():
    for command in _commands("bench/"):
        assert (ROOT / command[1]).is_file(), command


def test_orig_tiny_preset_has_issue_12_shapes():
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step

    preset = train_step.PRESETS["orig-tiny"]
    tokens_per_image = (preset["vision"]["image_size"] // preset["vision"]["patch_size"]) ** 2
    assert tokens_per_image == 729 and preset["seq_len"] == 772 and preset["batch"] == 4
    assert preset["seq_len"] % preset["loss_chunk"] == 0 and preset["remat"] == "none"


def test_a_bad_remat_policy_is_refused():
    sys.path.insert(0, str(ROOT / "bench"))
    import train_step

    with pytest.raises(SystemExit):
        train_step.parse_args(["--remat", "sometimes"])


def test_decode_bench_runs_both_libraries_on_tiny_shapes(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import decode

    decode.main(["--shape", "tiny", "--batch-sizes", "1,2", "--prompt-tokens", "24", "--new-tokens", "3",
                 "--recompute-tokens", "2", "--rounds", "1", "--steps-per-dispatch", "1,2"])
    out = capsys.readouterr().out
    for batch in (1, 2):
        for name in ("ours/1", "ours/2", "transformers", "recompute"):
            assert f"batch {batch} {name:>12}:" in out
        for block in (1, 2):
            assert f"batch {batch} decode ratio wings_jax ({block} steps per dispatch) / transformers:" in out


def test_decode_steps_bench_runs_on_tiny_shapes(capsys):
    sys.path.insert(0, str(ROOT / "bench"))
    import decode_steps

    decode_steps.main(["--shape", "tiny", "--cache-slots", "272"])
    out = capsys.readouterr().out
    assert "step learners,   272 cache slots:" in out and "step no wings,   272 cache slots:" in out
    assert out.count("whole-vocabulary sort") == 3
