"""lmms-eval: image requests go through Wings' ChatML prompt, the real image preprocessing and the tower;
greedy generations of a local image task equal the decoder's own, a local multiple-choice image task scores as
wings_jax.evaluate (per-token mean), two local processes give one process's samples.
Needs the `lmms` extra (lmms-eval, hence torchvision); skipped where it does not import."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_env import xla_flags
from local_ports import free_port

pytest.importorskip("lmms_eval.evaluator")

from lmms_eval_tasks.utils import doc_to_visual  # noqa: E402
from test_generate import save_vision_checkpoint  # noqa: E402
from wings_jax.data.conversation import Turn  # noqa: E402
from wings_jax.inference import (Engine, Sampling, detokenize, encode_chat, load_for_inference,  # noqa: E402
                                 with_image_placeholders)
from wings_jax.multiple_choice import Question, accuracy_report, score_options  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "lmms_eval_tasks")  # the YAML files name their data relative to ROOT


def _docs():
    with open(os.path.join(ROOT, TASKS, "mm.jsonl")) as f:
        return [json.loads(line) for line in f]


def _command(ckpt, out, tasks):
    return [sys.executable, "-m", "wings_jax.lmms_eval", "--model_args", f"ckpt={ckpt}", "--tasks", ",".join(tasks),
            "--include_path", TASKS, "--batch_size", "4", "--output_path", out, "--log_samples"]


def _env(devices, **extra):
    return {**os.environ, "XLA_FLAGS": xla_flags(devices), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT, **extra}


def _samples(out, task):
    [path] = glob.glob(os.path.join(out, f"*samples_{task}.jsonl"))
    with open(path) as f:
        return {r["doc_id"]: r["filtered_resps"] for r in map(json.loads, f)}


def _losses(samples):
    """{doc: [loss per option]} of a multiple-choice task's samples (lmms-eval logs them as strings)."""
    return {d: [float(loss) for loss, _ in resps] for d, resps in samples.items()}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(checkpoint, output dir) of one lmms-eval run of both local tasks."""
    root = tmp_path_factory.mktemp("lmms")
    ckpt, out = save_vision_checkpoint(str(root)), str(root / "out")
    done = subprocess.run(_command(ckpt, out, ("wings_mm_gen", "wings_mm_mc")), cwd=ROOT, env=_env(2),
                          capture_output=True, text=True, timeout=900)
    text = done.stdout + done.stderr
    assert done.returncode == 0 and "Error during evaluation" not in text, text  # lmms-eval logs it, status 0
    return ckpt, out


def test_generations_equal_the_decoders(run):
    ckpt, out = run
    got = _samples(out, "wings_mm_gen")
    model, tokenizer = load_for_inference(ckpt)
    prompts = [encode_chat(model.cfg, tokenizer, [Turn("user", with_image_placeholders(d["question"], 1))],
                           doc_to_visual(d)) for d in _docs()]
    eot = tokenizer.eos_token_id
    results = Engine(model).generate(prompts, 6, Sampling(), stop_ids=(eot,))
    expected = {i: detokenize(tokenizer, r.token_ids).split("\n\n")[0] for i, r in enumerate(results)}
    assert got == expected


def test_multiple_choice_scores_equal_evaluate(run, tmp_path):
    """lmms-eval picks the option of least loss: the per-token mean log-likelihood of evaluate, negated."""
    ckpt, out = run
    questions = []
    for i, d in enumerate(_docs()):
        image = str(tmp_path / f"{i}.png")
        doc_to_visual(d)[0].save(image)
        questions.append(Question(f"doc {i}", d["question"], tuple(" " + c for c in d["choices"]), d["answer"],
                                  image, None))
    model, tokenizer = load_for_inference(ckpt)
    expected = score_options(model, tokenizer, questions, batch_size=3, progress=False, score="mean")
    got = _losses(_samples(out, "wings_mm_mc"))
    assert sorted(got) == list(range(len(questions)))
    for doc, scores in enumerate(expected):
        np.testing.assert_allclose(got[doc], -scores, rtol=1e-5, atol=1e-5, err_msg=str(doc))
    [path] = glob.glob(os.path.join(out, "*_results.json"))
    with open(path) as f:
        accuracy = json.load(f)["results"]["wings_mm_mc"]["acc,none"]
    assert accuracy == accuracy_report(questions, expected)["accuracy"]


def test_two_processes_give_one_process_samples(run, tmp_path):
    """Each process is one lmms-eval rank (torchrun's variables) with a share of the documents; rank 0 gathers
    every sample and alone writes the results."""
    ckpt, single = run
    port = str(free_port())
    outs = [str(tmp_path / f"rank{i}") for i in range(2)]
    processes = [subprocess.Popen(_command(ckpt, outs[i], ("wings_mm_mc",)), cwd=ROOT, stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env=_env(1, WORLD_SIZE="2", RANK=str(i), MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
                 for i in range(2)]
    texts = [p.communicate(timeout=900)[0] for p in processes]
    for p, text in zip(processes, texts):
        assert p.returncode == 0 and "Error during evaluation" not in text, text
    assert "on rank 1" in texts[1]
    a, b = _losses(_samples(outs[0], "wings_mm_mc")), _losses(_samples(single, "wings_mm_mc"))
    assert a.keys() == b.keys()
    for doc in a:
        np.testing.assert_allclose(a[doc], b[doc], atol=1e-5, err_msg=str(doc))
    assert not glob.glob(os.path.join(outs[1], "*"))


def test_several_hosts_need_torchruns_variables(monkeypatch, capsys):
    from wings_jax.lmms_eval import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    for name in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    assert main(["--model_args", "ckpt=unused", "--tasks", "wings_mm_mc"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "error: WORLD_SIZE=2 needs RANK, MASTER_ADDR, MASTER_PORT set too (torchrun sets them all)"
