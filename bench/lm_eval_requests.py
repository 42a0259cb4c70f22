"""Requests per second of the wings_jax model of lm-eval (``--harness lm``) or lmms-eval (``--harness lmms``)
on a checkpoint, through the harness's own request objects.

    python bench/lm_eval_requests.py --ckpt CKPT [--harness lm|lmms] [--requests 256] [--batch-size 16] \
        [--gen-tokens 16]

Random-text requests (context 10-50 words, continuations 1-3 words; generations of exactly ``--gen-tokens``
tokens, no stop string hit) go through the model's ``loglikelihood`` and ``generate_until``. With ``lmms``
(the checkpoint needs a vision tower) every request is a document with one random picture of 20-60 x 20-60
pixels, read, padded, resized and encoded by the tower per request as lmms-eval sends them.
Each kind runs twice; the second, after every shape is compiled, is timed.
"""
from __future__ import annotations

import argparse
import time
from typing import Callable

import numpy as np


def _text(rng: np.random.RandomState, words: int) -> str:
    vocab = ["the", "river", "stone", "quick", "light", "seven", "over", "and", "town", "morning", "rain"]
    return " ".join(rng.choice(vocab, words))


def _lm(args: argparse.Namespace, rng: np.random.RandomState) -> tuple[object, list, list, dict]:
    from lm_eval.api.instance import Instance

    from wings_jax.lm_eval import WingsLM

    gen = {"until": ["@@@"], "max_gen_toks": args.gen_tokens}
    scored = [Instance("loglikelihood", {}, (_text(rng, rng.randint(10, 50)), " " + _text(rng, rng.randint(1, 4))), i)
              for i in range(args.requests)]
    generated = [Instance("generate_until", {}, (_text(rng, rng.randint(10, 50)), gen), i)
                 for i in range(args.requests // 4)]
    return WingsLM(args.ckpt, batch_size=args.batch_size), scored, generated, {"disable_tqdm": True}


def _picture(doc: dict) -> list:
    from PIL import Image

    return [Image.fromarray(doc["pixels"])]


def _meta(doc_id: int) -> dict:
    return {"task": "bench", "doc_id": doc_id, "repeats": 1}


def _lmms(args: argparse.Namespace, rng: np.random.RandomState) -> tuple[object, list, list, dict]:
    from lmms_eval.api.instance import Instance

    from wings_jax.lmms_eval import WingsLMMS

    lm = WingsLMMS(args.ckpt, batch_size=args.batch_size)
    docs = [{"pixels": rng.randint(0, 256, (rng.randint(20, 61), rng.randint(20, 61), 3), np.uint8)}
            for _ in range(args.requests)]
    lm.task_dict = {"bench": {"test": docs}}
    gen = {"until": ["@@@"], "max_new_tokens": args.gen_tokens}
    scored = [Instance("loglikelihood", (_text(rng, rng.randint(10, 50)), " " + _text(rng, rng.randint(1, 4)),
                                         _picture, i, "bench", "test"), i, _meta(i)) for i in range(args.requests)]
    generated = [Instance("generate_until", (_text(rng, rng.randint(10, 50)), gen, _picture, i, "bench", "test"), i,
                          _meta(i)) for i in range(args.requests // 4)]
    lm._rank = 1  # no progress bars (lmms-eval's models show them on rank 0 only)
    return lm, scored, generated, {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--harness", choices=("lm", "lmms"), default="lm")
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=16)
    args = p.parse_args()
    build: Callable = _lm if args.harness == "lm" else _lmms
    lm, scored, generated, kwargs = build(args, np.random.RandomState(0))
    for name, run, requests in (("loglikelihood", lm.loglikelihood, scored),
                                ("generate_until", lm.generate_until, generated)):
        run(requests, **kwargs)  # compiles every shape
        start = time.perf_counter()
        run(requests, **kwargs)
        seconds = time.perf_counter() - start
        print(f"{args.harness} {name}: {len(requests)} requests in {seconds:.2f} s = "
              f"{len(requests) / seconds:.1f} requests/s (batch {lm.engine.batch_size})")


if __name__ == "__main__":
    main()
