"""lmms-eval: image requests go through Wings' ChatML prompt, the real image preprocessing and the tower;
greedy generations of a local image task equal the decoder's own, log-likelihoods equal wings_jax.evaluate's.
Needs the `lmms` extra (lmms-eval, hence torchvision); skipped where it does not import."""
import glob
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from jax_env import xla_flags

pytest.importorskip("lmms_eval.evaluator")

from lmms_eval_tasks.utils import doc_to_visual  # noqa: E402
from test_generate import save_vision_checkpoint  # noqa: E402
from wings_jax.data.conversation import Turn  # noqa: E402
from wings_jax.inference import (Engine, Sampling, detokenize, encode_chat, load_for_inference,  # noqa: E402
                                 with_image_placeholders)
from wings_jax.evaluate import Question, score_options  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TASKS = os.path.join("tests", "lmms_eval_tasks")


def _docs():
    with open(os.path.join(ROOT, TASKS, "mm.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return save_vision_checkpoint(str(tmp_path_factory.mktemp("lmms")))


def test_generations_equal_the_decoders(ckpt, tmp_path):
    out = str(tmp_path / "out")
    env = {**os.environ, "XLA_FLAGS": xla_flags(2), "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "wings_jax.lmms_eval", "--model_args", f"ckpt={ckpt}", "--tasks",
                           "wings_mm_gen", "--include_path", TASKS, "--batch_size", "4", "--output_path", out,
                           "--log_samples"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout + done.stderr
    [path] = glob.glob(os.path.join(out, "*samples_wings_mm_gen.jsonl"))
    with open(path) as f:
        got = {r["doc_id"]: r["filtered_resps"] for r in map(json.loads, f)}
    model, tokenizer = load_for_inference(ckpt)
    prompts = [encode_chat(model.cfg, tokenizer, [Turn("user", with_image_placeholders(d["question"], 1))],
                           doc_to_visual(d)) for d in _docs()]
    eot = tokenizer.eos_token_id
    results = Engine(model).generate(prompts, 6, Sampling(), stop_ids=(eot,))
    expected = {i: detokenize(tokenizer, r.token_ids).split("\n\n")[0] for i, r in enumerate(results)}
    assert got == expected


class _Request:
    def __init__(self, *args):
        self.args = args


def test_loglikelihoods_equal_evaluate(ckpt, tmp_path):
    from wings_jax.lmms_eval import WingsLMMS

    lm = WingsLMMS(ckpt, batch_size=4)
    docs = _docs()
    lm.task_dict = {"t": {"test": docs}}
    requests = [_Request(d["question"], " " + c, doc_to_visual, i, "t", "test")
                for i, d in enumerate(docs) for c in d["choices"]]
    got = [s for s, _ in lm.loglikelihood(requests)]
    questions = []
    for i, d in enumerate(docs):
        image = str(tmp_path / f"{i}.png")
        doc_to_visual(d)[0].save(image)
        questions.append(Question(f"doc {i}", d["question"], tuple(" " + c for c in d["choices"]), 0, image, None))
    model, tokenizer = load_for_inference(ckpt)
    expected = np.concatenate(score_options(model, tokenizer, questions, batch_size=3, progress=False))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-4)
