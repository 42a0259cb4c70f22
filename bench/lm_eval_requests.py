"""lm-eval requests per second of the wings_jax model on a checkpoint (the harness's own request objects).

    python bench/lm_eval_requests.py --ckpt CKPT [--requests 256] [--batch-size 16] [--gen-tokens 16]

Random-text requests (context 20-100 tokens, continuations 1-8 tokens; generations of exactly
``--gen-tokens`` tokens, no stop string hit) go through ``WingsLM.loglikelihood`` and ``generate_until``.
Each kind runs twice; the second, after every shape is compiled, is timed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np
from lm_eval.api.instance import Instance

from wings_jax.lm_eval import WingsLM


def _text(rng: np.random.RandomState, words: int) -> str:
    vocab = ["the", "river", "stone", "quick", "light", "seven", "over", "and", "town", "morning", "rain"]
    return " ".join(rng.choice(vocab, words))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--gen-tokens", type=int, default=16)
    args = p.parse_args()
    lm = WingsLM(args.ckpt, batch_size=args.batch_size)
    rng = np.random.RandomState(0)
    scored = [Instance("loglikelihood", {}, (_text(rng, rng.randint(10, 50)), " " + _text(rng, rng.randint(1, 4))), i)
              for i in range(args.requests)]
    gen = {"until": ["@@@"], "max_gen_toks": args.gen_tokens}
    generated = [Instance("generate_until", {}, (_text(rng, rng.randint(10, 50)), gen), i)
                 for i in range(args.requests // 4)]
    for name, run, requests in (("loglikelihood", lm.loglikelihood, scored),
                                ("generate_until", lm.generate_until, generated)):
        run(requests, disable_tqdm=True)  # compiles every shape
        start = time.perf_counter()
        run(requests, disable_tqdm=True)
        seconds = time.perf_counter() - start
        print(f"{name}: {len(requests)} requests in {seconds:.2f} s = {len(requests) / seconds:.1f} requests/s "
              f"(batch {lm.engine.batch_size})")


if __name__ == "__main__":
    main()
