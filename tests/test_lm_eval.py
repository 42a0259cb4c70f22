"""lm-eval: a Qwen2 imported with import-hf scores and generates as lm-eval's own `--model hf` on the original
directory (multiple choice, rolling log-likelihood, generate_until, over local tasks in tests/lm_eval_tasks);
reference-mode rows do not depend on their batch; two local processes give one process's samples."""
import dataclasses
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from flax import nnx

from hf_fixtures import make_qwen
from jax_env import xla_flags
from local_ports import free_port
from wings_fixtures import TINY_LLM, TINY_VISION, randomize_learner_b
from wings_jax.convert.__main__ import main as convert_main
from wings_jax.checkpoint import save_model
from wings_jax.data.tokenizer import build_local_qwen_tokenizer
from wings_jax.model.learners import WingsConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig

pytest.importorskip("lm_eval")
pytest.importorskip("accelerate")  # lm-eval's hf model needs it

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "lm_eval_tasks")  # the YAML files name their data relative to ROOT
ALL_TASKS = ("wings_mc", "wings_rolling", "wings_gen")
MAX_LENGTH = 64  # short windows: the rolling task's longest text spans several


def _env(devices):
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}


def _common(out, tasks):
    return ["--tasks", ",".join(tasks), "--include_path", TASKS, "--batch_size", "4", "--output_path", out,
            "--log_samples"]


def _run(command, devices=2):
    done = subprocess.run(command, cwd=ROOT, env=_env(devices), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    return done


def _samples(out, task):
    [path] = glob.glob(os.path.join(out, "*", f"samples_{task}_*.jsonl"))
    with open(path) as f:
        return {r["doc_id"]: r["filtered_resps"] for r in map(json.loads, f)}


def _wings_command(ckpt, out, tasks=ALL_TASKS, extra=()):
    return [sys.executable, "-m", "wings_jax.lm_eval", "--model_args", f"ckpt={ckpt},max_length={MAX_LENGTH}",
            *_common(out, tasks), *extra]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """(checkpoint, samples dir of wings_jax, samples dir of lm-eval's hf) for all tasks."""
    root = tmp_path_factory.mktemp("lm_eval")
    llm_dir, ckpt = str(root / "qwen"), str(root / "ckpt")
    make_qwen(llm_dir, "qwen2.5", vocab_size=512, seed=1)
    build_local_qwen_tokenizer(llm_dir, 512)
    assert convert_main(["import-hf", "--llm", llm_dir, "--out", ckpt, "--stage", "finetune",
                         "--router-max-len", "256"]) == 0
    ours, theirs = str(root / "wings"), str(root / "hf")
    _run(_wings_command(ckpt, ours))
    _run([sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
          f"pretrained={llm_dir},dtype=float32,max_length={MAX_LENGTH}", "--device", "cpu", *_common(theirs, ALL_TASKS)])
    return ckpt, ours, theirs


def _loglikelihoods(samples):
    """{doc: [(loglikelihood, is_greedy) per request]} of a loglikelihood task's samples."""
    return {d: [(float(r[0]), r[1]) if isinstance(r, list) else (float(r), None) for r in resps]
            for d, resps in samples.items()}


@pytest.mark.parametrize("task", ["wings_mc", "wings_rolling"])
def test_loglikelihoods_match_hf(runs, task):
    _, ours, theirs = runs
    a, b = _loglikelihoods(_samples(ours, task)), _loglikelihoods(_samples(theirs, task))
    assert a.keys() == b.keys() and len(a) >= 3
    for doc in a:
        np.testing.assert_allclose([s for s, _ in a[doc]], [s for s, _ in b[doc]], atol=1e-3, err_msg=str(doc))
        assert [g for _, g in a[doc]] == [g for _, g in b[doc]]


def test_greedy_generations_match_hf(runs):
    _, ours, theirs = runs
    a, b = _samples(ours, "wings_gen"), _samples(theirs, "wings_gen")
    assert a == b and len(a) == 4
    assert any("five" not in text[0] for text in a.values())  # generation stopped at an `until` string


def test_results_name_the_checkpoint(runs):
    ckpt, ours, _ = runs
    [path] = glob.glob(os.path.join(ours, "*", "results_*.json"))
    with open(path) as f:
        config = json.load(f)["config"]
    assert config["model_ckpt"] == ckpt and config["mixing"] == "corrected" and "note" not in config


def test_two_processes_give_one_process_samples(runs, tmp_path):
    """Each process is one lm-eval rank with a share of the requests; rank 0 gathers every sample."""
    ckpt, single, _ = runs
    out = str(tmp_path / "two")
    address = f"127.0.0.1:{free_port()}"
    commands = [_wings_command(ckpt, out if i == 0 else str(tmp_path / "rank1"), ("wings_mc",),
                               ("--coordinator_address", address, "--num_processes", "2", "--process_id", str(i)))
                for i in range(2)]
    processes = [subprocess.Popen(c, cwd=ROOT, env=_env(1), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                  text=True) for c in commands]
    outputs = [p.communicate(timeout=900)[0] for p in processes]
    for p, text in zip(processes, outputs):
        assert p.returncode == 0, text
    a, b = _loglikelihoods(_samples(out, "wings_mc")), _loglikelihoods(_samples(single, "wings_mc"))
    assert a.keys() == b.keys()
    for doc in a:
        np.testing.assert_allclose([s for s, _ in a[doc]], [s for s, _ in b[doc]], atol=1e-4)
    assert not glob.glob(os.path.join(tmp_path, "rank1", "*", "results_*.json"))  # only rank 0 writes


def test_reference_rows_score_as_batch_of_one(tmp_path):
    """The released code's forward depends on the batch: each row must score as it does alone."""
    from wings_jax.harness import REFERENCE_NOTE
    from wings_jax.lm_eval import WingsLM

    tokenizer_dir, ckpt = str(tmp_path / "tokenizer"), str(tmp_path / "ckpt")
    build_local_qwen_tokenizer(tokenizer_dir, 512)
    cfg = WingsModelConfig(llm=dataclasses.replace(TINY_LLM, vocab_size=512), vision=TINY_VISION,
                           wings=WingsConfig(stage="finetune", lora_rank=8, router_max_len=128, mixing="reference"))
    model = WingsModel(cfg, Runtime(), rngs=nnx.Rngs(0))
    randomize_learner_b(model)
    save_model(ckpt, model, tokenizer_src=tokenizer_dir)
    lm = WingsLM(ckpt, batch_size=4)
    rng = np.random.RandomState(0)
    # rows shorter than one image (4 tokens) take the released code's other branch
    requests = [(None, list(rng.randint(0, 500, n)), list(rng.randint(0, 500, k))) for n, k in
                [(2, 1), (9, 3), (30, 5), (1, 2), (17, 1)]]
    together = lm._loglikelihood_tokens(requests, disable_tqdm=True)
    alone = [lm._loglikelihood_tokens([r], disable_tqdm=True)[0] for r in requests]
    np.testing.assert_allclose([s for s, _ in together], [s for s, _ in alone], rtol=1e-5)
    assert lm.get_model_info()["note"] == REFERENCE_NOTE


def test_bad_command_lines_give_one_line_errors(tmp_path, capsys, monkeypatch):
    from wings_jax.lm_eval import main

    assert main(["--model", "hf", "--tasks", "wings_mc"]) == 2
    assert "--model is always wings_jax" in capsys.readouterr().err
    missing = str(tmp_path / "missing")
    monkeypatch.chdir(ROOT)
    assert main(["--model_args", f"ckpt={missing}", "--tasks", "wings_mc", "--include_path", TASKS]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and missing in err and "Traceback" not in err
