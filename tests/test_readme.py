"""Every command in README.md and launch/README.md runs, as written, on tiny local fixtures.

The commands are extracted from the ```bash blocks of the two files (backslash continuations joined,
comments dropped). Each must have an entry in COMMANDS, keyed by its exact text: a README command
without an entry fails `test_every_readme_command_is_mapped`, and a changed command loses its entry,
so the README cannot drift from what is tested.

How a command runs here: in one temporary directory per module that holds, under the names the README
uses, tiny fixtures (random `Qwen1.5-7B-Chat` / `siglip-so400m-patch14-384` / `Wings-Qwen1_5-8B`
model directories instead of the downloaded hub models, `llava_instruct.json` + `images/`,
`mmlu.jsonl`, prepared `gs_b/pretrain-*` / `gs_b/text-*` shards), with `configs/` and `launch/` linked
from the repository. The command's named substitutions (SUBSTITUTIONS: what each replaces and why) are
applied first; everything else stays as written. `python -m wings_jax.X ...` runs in this process
(the module's main(), sharing its compilation cache), other commands in bash. The commands run in
README order, since later ones read what earlier ones wrote (the demo run, converted checkpoints, data).

Adding a README command is a one-line change to COMMANDS:
    "<command as extracted, one line>": ("substitution", ...),      # () when it runs as written
and, if it needs input that does not exist yet, a fixture file in `workspace`.
"""
from __future__ import annotations

import contextlib
import importlib
import importlib.util
import json
import os
import re
import runpy
import shlex
import subprocess
import textwrap
from pathlib import Path

import numpy as np
import pytest
import transformers
from PIL import Image

from hf_fixtures import make_qwen
from local_ports import free_port
from wings_fixtures import make_released_checkpoint
from wings_jax.data.prepare import prepare
from wings_jax.data.tokenizer import build_local_qwen_tokenizer

REPO = Path(__file__).resolve().parents[1]
READMES = ("README.md", "launch/README.md")
VOCAB = 512

# name -> (why, function from command text to the command run here)
SUBSTITUTIONS = {
    "ci-runs-it": ("the test command is what .ci/run runs (checked verbatim there); running it here would run "
                   "this test inside itself", None),
    "skip-install": ("`pip install -e .[EXTRA] && ` dropped: the tests run in the installed package (the test "
                     "extra brings what the other extras do)", lambda c: re.sub(r"^pip install -e \S+ && ", "", c)),
    "test-forgetting": ("run by tests/test_forgetting.py with the same flags plus --quick --seeds 1 --text-fraction 0.25 (the "
                        "default experiment takes ~14 min here), which also checks its results", None),
    "local-tasks": ("`--tasks <hub tasks>` -> the local multiple-choice task (tests/lm_eval_tasks, offline): the hub "
                    "data sets cannot be downloaded here",
                    lambda c: "HF_DATASETS_OFFLINE=1 " + re.sub(r"--tasks \S+", "--tasks wings_mc --include_path "
                                                                "tests/lm_eval_tasks", c)),
    "local-mm-tasks": ("`--tasks <hub tasks>` -> the local image task (tests/lmms_eval_tasks, offline): the hub data "
                       "sets cannot be downloaded here",
                       lambda c: "HF_DATASETS_OFFLINE=1 " + re.sub(r"--tasks \S+", "--tasks wings_mm_gen "
                                                                   "--include_path tests/lmms_eval_tasks", c)),
    "one-host-torchrun": ("torchrun's N hosts -> one host, HOST0 -> 127.0.0.1 on a free port (no pod here)",
                          lambda c: c.replace("--nnodes N --node_rank I", "--nnodes 1 --node_rank 0").replace(
                              "--master_addr HOST0 --master_port 29500",
                              f"--master_addr 127.0.0.1 --master_port {free_port()}")),
    "one-host-cluster": ("--distributed -> an explicit one-process cluster on 127.0.0.1 (no pod environment here to "
                         "describe the cluster)",
                         lambda c: c.replace("--distributed", "--coordinator_address 127.0.0.1:"
                                             f"{free_port()} --num_processes 1 --process_id 0")),
    "demo-steps": ("--config.train.steps=30 appended: the demo's 300 steps take ~1.5 min here",
                   lambda c: c + " --config.train.steps=30"),
    "gs-local": ("gs://b/ -> the local directory gs_b/ (no network)", lambda c: c.replace("gs://b/", "gs_b/")),
    "gcloud-cp": ("`gcloud storage cp 'GLOB' DST` -> `cp GLOB DST` (no gcloud here; the glob is expanded by bash "
                  "instead of gcloud)", lambda c: re.sub(r"gcloud storage cp '([^']*)'", r"cp \1", c)),
    "tiny-recipe": ("configs/{pretrain,finetune}.py -> tiny_configs/ wrappers: the same recipe with the model from "
                    "init_from (not the 7B description), 2 steps of 8 rows of 128 tokens, float32",
                    lambda c: re.sub(r"configs/(pretrain|finetune)\.py", r"tiny_configs/\1.py", c)),
    "tiny-compile": ("configs/finetune.py -> tiny_configs/finetune_compile.py: the recipe with the demo's model "
                     "size, compiled for the same slice (the 7B plan takes minutes)",
                     lambda c: c.replace("configs/finetune.py", "tiny_configs/finetune_compile.py")),
    "tpu-dry-run": ("--dry-run appended: gcloud is not here (a fake gcloud on PATH fails if called)",
                    lambda c: c + " --dry-run"),
    "sbatch-dry-run": ("`sbatch [options] SCRIPT` -> `DRY_RUN=1 SLURM_*=... bash SCRIPT`: the script's own dry run "
                       "with the variables SLURM would set (and a fake scontrol on PATH)",
                       lambda c: re.sub(r"^sbatch( --\S+)* launch/gpu_slurm\.sbatch",
                                        f"{_SLURM_ENV} bash launch/gpu_slurm.sbatch", c)),
}
_SLURM_ENV = "DRY_RUN=1 SLURM_JOB_NODELIST=node[01-02] SLURM_NTASKS=2 SLURM_JOB_ID=7"

COMMANDS = {
    # README.md, set-up
    "pip install -e . && python -m wings_jax.train": ("skip-install", "demo-steps"),
    "pip install -e '.[test]' && python -m pytest": ("ci-runs-it",),
    # README.md, using it
    "python -m wings_jax.convert import-hf --llm Qwen1.5-7B-Chat --vision siglip-so400m-patch14-384 --out ckpt/base":
        (),
    "python -m wings_jax.convert import-wings --src Wings-Qwen1_5-8B --out ckpt/wings": (),
    "python -m wings_jax.convert export-wings --ckpt ckpt/wings --out released_again": (),
    "python -m wings_jax.convert export-hf-llm --ckpt ckpt/wings --out qwen_only": (),
    "python -m wings_jax.data.prepare --input llava_instruct.json --image-root images/ "
    "--output data/instruct.array_record --num-shards 64": (),
    "gcloud storage cp 'data/instruct.array_record-*' gs://b/": ("gcloud-cp", "gs-local"),
    "python -m wings_jax.train --config configs/pretrain.py:main=gs://b/pretrain-*.array_record "
    "--config.init_from=ckpt/base --workdir gs://b/stage1": ("tiny-recipe", "gs-local"),
    "python -m wings_jax.train --config configs/finetune.py:main=gs://b/instruct.array_record,"
    "text=gs://b/text-*.array_record --config.init_from=gs://b/stage1 --workdir gs://b/stage2":
        ("tiny-recipe", "gs-local"),
    "python -m wings_jax.train --config configs/finetune.py --compile_only "
    "--topology v5p-64": ("tiny-compile",),
    'python -m wings_jax.generate --ckpt runs/demo --prompt "What colour is the image?" '
    "--image runs/demo_data/images/00000.png": (),
    "python -m wings_jax.evaluate --ckpt ckpt/wings --data mmlu.jsonl --batch-size 16": (),
    "pip install -e '.[experiments]' && python -m wings_jax.experiments.forgetting --out runs/forgetting":
        ("test-forgetting",),
    # README.md, standard benchmarks (lm-eval commands run in bash: they read HF_DATASETS_OFFLINE)
    "HF_DATASETS_OFFLINE=1 python -m wings_jax.lm_eval --model_args ckpt=ckpt/base,max_length=64 --tasks "
    "wings_mc,wings_rolling,wings_gen --include_path tests/lm_eval_tasks --batch_size 8 --output_path runs/lm_eval "
    "--log_samples": (),
    "python -m wings_jax.lm_eval --model_args ckpt=ckpt/wings,dtype=bfloat16 --batch_size 16 --output_path "
    "runs/retention --tasks mmlu,cmmlu,ceval-valid,arc_easy,arc_challenge,race,boolq,triviaqa,nq_open,hellaswag,"
    "winogrande,piqa,social_iqa,commonsense_qa,gsm8k,minerva_math,humaneval,mbpp --confirm_run_unsafe_code":
        ("local-tasks",),
    "python -m wings_jax.lm_eval --distributed --model_args ckpt=gs://b/stage2,dtype=bfloat16 --tasks mmlu "
    "--batch_size 16 --output_path runs/retention": ("one-host-cluster", "gs-local", "local-tasks"),
    "HF_DATASETS_OFFLINE=1 python -m wings_jax.lmms_eval --model_args ckpt=ckpt/wings --tasks wings_mm_gen,wings_mm_mc "
    "--include_path tests/lmms_eval_tasks --batch_size 4 --output_path runs/lmms_eval --log_samples": (),
    "python -m wings_jax.lmms_eval --model_args ckpt=ckpt/wings,dtype=bfloat16 --batch_size 8 --output_path "
    "runs/multimodal --tasks mmmu_val,mme,mmbench_en_dev,scienceqa_img,seedbench,ai2d,hallusion_bench_image":
        ("local-mm-tasks",),
    "torchrun --nnodes N --node_rank I --nproc_per_node 1 --master_addr HOST0 --master_port 29500 -m "
    "wings_jax.lmms_eval --model_args ckpt=ckpt/wings,dtype=bfloat16 --tasks mme --batch_size 8 --output_path "
    "runs/multimodal": ("one-host-torchrun", "local-mm-tasks"),
    # launch/README.md
    'S="--project my-proj --zone us-east5-a --name wings-v5p"': (),
    "launch/tpu_pod.sh all $S --accelerator v5p-32 --config configs/finetune.py:main=gs://my-bucket/data/"
    "instruct.array_record --workdir gs://my-bucket/wings/run1 --config.optim.warmup_ratio=0.05": ("tpu-dry-run",),
    "launch/tpu_pod.sh logs $S": ("tpu-dry-run",),
    "launch/tpu_pod.sh status $S": ("tpu-dry-run",),
    "launch/tpu_pod.sh stop $S": ("tpu-dry-run",),
    "launch/tpu_pod.sh sync $S": ("tpu-dry-run",),
    "launch/tpu_pod.sh train $S --config ... --workdir gs://...": ("tpu-dry-run",),
    "launch/tpu_pod.sh delete $S": ("tpu-dry-run",),
    "sbatch --export=ALL,VENV=$PWD/.venv launch/gpu_slurm.sbatch --config configs/finetune.py:main=gs://my-bucket/"
    "data/instruct.array_record --workdir gs://my-bucket/wings/run1 --config.optim.warmup_ratio=0.05":
        ("sbatch-dry-run",),
    "sbatch --nodes=4 --ntasks-per-node=8 launch/gpu_slurm.sbatch --config ... --workdir ...": ("sbatch-dry-run",),
    "DRY_RUN=1 SLURM_JOB_NODELIST=node[01-02] SLURM_NTASKS=2 bash launch/gpu_slurm.sbatch --config ... --workdir ...":
        (),
}


def readme_commands(text: str) -> list[str]:
    """The commands of a Markdown text's ```bash blocks: continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        joined = re.sub(r"\\\n\s*", "", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#\s.*$", "", line).strip()  # a trailing "  # comment"
            if line and not line.startswith("#"):
                commands.append(" ".join(line.split()))
    return commands


ALL = [(name, command) for name in READMES for command in readme_commands((REPO / name).read_text())]


def test_extraction_joins_continuations_and_drops_comments():
    text = "x\n```bash\n# a comment\nrun --a 1 \\\n    --b 2   # why\n\nsecond\n```\n```\nnot bash\n```\n"
    assert readme_commands(text) == ["run --a 1 --b 2", "second"]


def test_every_readme_command_is_mapped():
    unmapped = [f"{name}: {command}" for name, command in ALL if command not in COMMANDS]
    assert not unmapped, "README commands without a COMMANDS entry in tests/test_readme.py:\n" + "\n".join(unmapped)
    stale = sorted(set(COMMANDS) - {command for _, command in ALL})
    assert not stale, f"COMMANDS entries no README holds any more: {stale}"
    unknown = {s for subs in COMMANDS.values() for s in subs} - set(SUBSTITUTIONS)
    assert not unknown, f"unknown substitutions {unknown}"


def test_set_up_commands_are_what_ci_runs():
    """The README's Set-up section holds exactly two commands, the demo (install + trainer) and the test command,
    which is .ci/run's verbatim."""
    section = re.search(r"^## Set-up\n(.*?)^## ", (REPO / "README.md").read_text(), re.S | re.M).group(1)
    setup = readme_commands(section)
    ci = (REPO / ".ci" / "run").read_text()
    test_command = [c for c in setup if COMMANDS[c] == ("ci-runs-it",)]
    assert len(setup) == 2 and len(test_command) == 1 and test_command[0] in ci.splitlines()


# ------------------------------------------------------------------------------------------- fixtures


def _tiny_recipe_configs(root: Path) -> None:
    """tiny_configs/{pretrain,finetune,finetune_compile}.py: the repository's recipes, shrunk."""
    demo = runpy.run_path(str(REPO / "configs" / "demo.py"))["get_config"]()
    (root / "tiny_configs").mkdir()
    for stage in ("pretrain", "finetune"):
        (root / "tiny_configs" / f"{stage}.py").write_text(textwrap.dedent(f"""
            import ml_collections
            import runpy

            _recipe = runpy.run_path({str(REPO / "configs" / f"{stage}.py")!r})["get_config"]


            def get_config(arg=None):
                c = _recipe(arg)
                c.model.llm, c.model.vision = ml_collections.ConfigDict(), ml_collections.ConfigDict()  # init_from's
                c.train.update(dict(steps=2, global_batch_size=8, log_every=1, loss_chunk=128))
                c.data.update(dict(max_len=128, worker_count=0))
                c.runtime.update(dict(dtype="float32", remat="none"))
                c.checkpoint.update(dict(every=2, async_save=False))
                return c
            """))
    (root / "tiny_configs" / "finetune_compile.py").write_text(textwrap.dedent(f"""
        import runpy

        _recipe = runpy.run_path({str(REPO / "configs" / "finetune.py")!r})["get_config"]


        def get_config(arg=None):
            c = _recipe(arg)
            c.model.llm.update({demo.model.llm.to_dict()!r})
            c.model.vision.update({demo.model.vision.to_dict()!r})
            c.model.wings.update(dict(lora_rank=8, router_max_len=128))
            c.data.max_len = 128
            c.train.loss_chunk = 128
            return c
        """))


def _write_llava(path: Path, images: Path, n: int, with_images: bool) -> None:
    images.mkdir(exist_ok=True)
    records = []
    for i in range(n):
        colour = ("red", "green", "blue")[i % 3]
        record = {"id": str(i), "conversations": [
            {"from": "human", "value": ("<image>\n" if with_images else "") + f"What is {i} plus one?"},
            {"from": "gpt", "value": f"{i + 1}, and the colour is {colour}."}]}
        if with_images:
            name = f"{i:03d}.png"
            Image.fromarray(np.full((20, 30, 3), (i * 40 % 256, 90, 200), np.uint8)).save(images / name)
            record["image"] = name
        records.append(record)
    path.write_text(json.dumps(records))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """The directory the commands run in, with every input they read under the README's names."""
    root = tmp_path_factory.mktemp("readme")
    for linked in ("configs", "launch", "tests"):
        (root / linked).symlink_to(REPO / linked)
    # hub model names -> tiny random local models with the same directory names
    make_qwen(str(root / "Qwen1.5-7B-Chat"), "qwen1.5", vocab_size=VOCAB)
    build_local_qwen_tokenizer(root / "Qwen1.5-7B-Chat", VOCAB)
    transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, image_size=32,
        patch_size=8)).save_pretrained(str(root / "siglip-so400m-patch14-384"))
    make_released_checkpoint(str(root / "Wings-Qwen1_5-8B"), vocab=VOCAB)
    build_local_qwen_tokenizer(root / "Wings-Qwen1_5-8B", VOCAB)
    # data: LLaVA JSON + images for prepare; the pretrain / text shards the training commands read from gs://b/
    _write_llava(root / "llava_instruct.json", root / "images", 40, with_images=True)
    (root / "gs_b").mkdir()
    _write_llava(root / "pretrain.json", root / "images", 40, with_images=True)
    prepare(str(root / "pretrain.json"), str(root / "images"), str(root / "gs_b" / "pretrain-00000.array_record"),
            progress=False)
    _write_llava(root / "text.json", root / "images", 24, with_images=False)
    prepare(str(root / "text.json"), None, str(root / "gs_b" / "text-00000.array_record"), progress=False)
    (root / "mmlu.jsonl").write_text("".join(json.dumps(
        {"question": f"What is {i} plus one?", "options": [str(i + 1), str(i + 7), "no idea"], "answer": "A"}) + "\n"
        for i in range(5)))
    _tiny_recipe_configs(root)
    # fakes: a gcloud that fails if a dry run calls it; scontrol for the SLURM script's host list
    bindir = root / "fakebin"
    bindir.mkdir()
    for name, body in (("gcloud", "echo 'a dry run called gcloud' >&2; exit 99"),
                       ("scontrol", '[ "$1 $2" = "show hostnames" ] && printf "node01\\nnode02\\n" || exit 1')):
        (bindir / name).write_text(f"#!/bin/bash\n{body}\n")
        (bindir / name).chmod(0o755)
    return {"root": root, "shell_variables": [], "path": f"{bindir}{os.pathsep}{os.environ['PATH']}"}


@contextlib.contextmanager
def _inside(directory: Path):
    before = os.getcwd()
    os.chdir(directory)
    try:
        yield
    finally:
        os.chdir(before)


def _run_python_module(command: str) -> int:
    """`python -m wings_jax.X ARGS` through the module's main(ARGS), in this process."""
    words = shlex.split(command)
    assert words[:2] == ["python", "-m"], command
    try:
        module = importlib.import_module(words[2])
        if hasattr(module, "__path__"):  # a package runs its __main__
            module = importlib.import_module(words[2] + ".__main__")
        code = module.main(words[3:])
    except SystemExit as e:  # argparse, or a main that exits with its message
        code = e.code if isinstance(e.code, int) else 1
    return code or 0


def _test_id(index: int, readme: str, command: str) -> str:
    """README.md:7:wings_jax_convert_import_wings: the module (and subcommand) names it, for `pytest -k`."""
    words = command.split()
    start = words.index("-m") + 1 if "-m" in words else 0
    name = "_".join(w for w in words[start:start + 2] if not w.startswith("-"))
    return f"{readme}:{index}:{re.sub(r'[^A-Za-z0-9]+', '_', name)}"


@pytest.mark.parametrize("readme, command", ALL, ids=[_test_id(i, n, c) for i, (n, c) in enumerate(ALL)])
def test_readme_command_runs(workspace, readme, command, capfd):
    subs = COMMANDS.get(command)
    if subs is None:
        pytest.fail(f"unmapped README command (add it to COMMANDS): {command}")
    if "ci-runs-it" in subs:
        pytest.skip("checked by test_set_up_commands_are_what_ci_runs")
    if "test-forgetting" in subs:
        pytest.skip(SUBSTITUTIONS["test-forgetting"][0])
    if "--topology" in command and importlib.util.find_spec("libtpu") is None:
        pytest.skip("libtpu is not installed (the TPU compiler of --compile_only --topology)")
    for module, harness in (("wings_jax.lm_eval", "lm_eval"), ("wings_jax.lmms_eval", "lmms_eval")):
        if f"-m {module} " in command and importlib.util.find_spec(harness) is None:
            pytest.skip(f"{harness} is not installed here (its extra; .ci/run runs these in a second environment)")
    run = command
    for name in subs:
        run = SUBSTITUTIONS[name][1](run)
    words = shlex.split(run)
    if len(words) == 1 and re.fullmatch(r"[A-Za-z_]\w*=.*", words[0]):
        workspace["shell_variables"].append(run)  # a shell variable later commands of the block use
        return
    with _inside(workspace["root"]):
        if run.startswith("python -m wings_jax."):
            code = _run_python_module(run)
        else:
            script = "\n".join([*workspace["shell_variables"], run])
            env = {**os.environ, "PATH": workspace["path"]}
            code = subprocess.run(["bash", "-c", script], env=env, timeout=120).returncode
    out, err = capfd.readouterr()
    assert code == 0, f"{readme}: {command}\nran as: {run}\nexit {code}\nstdout:\n{out[-3000:]}\nstderr:\n{err[-3000:]}"
    if "--dry-run" in run or "DRY_RUN=1" in run:
        assert "+ " in out or "srun" in out, out  # printed what it would run
