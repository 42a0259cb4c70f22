"""Generation speed of wings_jax against transformers' own Qwen2 ``generate``, side by side in one run.

    python bench/decode.py [--batch-sizes 1,4] [--new-tokens 64] [--rounds 5] [--dtype float32] [--shape issue]

A random transformers Qwen2 (vocab 16000, width 512, MLP 1408, 8 layers, 8 heads; ``--shape tiny`` for a
smoke run) is saved to a temporary directory and imported with the package's own import (stage finetune:
learners of rank 64 and the router in every layer), so both libraries run the same language-model weights;
wings_jax also runs its learners (~12% more bytes per token). Prompts are ``--prompt-tokens`` random text
tokens (default 256, exactly a length bucket); decoding is greedy and cached, with no stop token so every
row generates ``--new-tokens``. Everything is compiled / warmed up first, then the libraries alternate for
``--rounds`` rounds and each figure is the median over rounds:
- time to first token: generate(max_new_tokens=1), i.e. the prefill and the first sample;
- prefill tokens/s: batch * prompt tokens / time to first token;
- decode tokens/s (wings_jax for each ``--steps-per-dispatch``, shown as ours/N): batch * (new_tokens - 1) / (time of generate(new_tokens) - time to first token);
- recompute tokens/s (wings_jax only): batch * ``--recompute-tokens`` / time of a recompute=True generate.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from typing import Callable

import jax
import numpy as np
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from wings_jax.convert.wings_params import build_from_hf
from wings_jax.data.assemble import Prompt
from wings_jax.inference import Engine
from wings_jax.model.learners import WingsConfig
from wings_jax.model.runtime import Runtime

SHAPES = {
    "issue": dict(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2),
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--prompt-tokens", type=int, default=256)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--recompute-tokens", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps-per-dispatch", default="1,16",
                        help="cached decode steps per device dispatch; each value is measured as its own run")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    parser.add_argument("--no-transformers", action="store_true",
                        help="wings_jax only (e.g. on an accelerator, where a CPU transformers is no comparison)")
    return parser.parse_args(argv)


def make_hf(directory: str, shape: str) -> Qwen2ForCausalLM:
    torch.manual_seed(0)
    config = Qwen2Config(max_position_embeddings=4096, tie_word_embeddings=False, **SHAPES[shape])
    model = Qwen2ForCausalLM(config).eval()
    model.save_pretrained(directory)
    return model


def timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def main(argv=None) -> None:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as directory:
        hf = make_hf(directory, args.shape)
        model, _ = build_from_hf(directory, None, WingsConfig(stage="finetune", lora_rank=64, router_max_len=4096),
                                 Runtime(dtype=args.dtype, param_dtype=args.dtype))
    if args.dtype == "bfloat16":
        hf = hf.to(torch.bfloat16)
    engine = Engine(model)
    rng = np.random.RandomState(0)
    n, new = args.prompt_tokens, args.new_tokens
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {torch.get_num_threads()} torch "
          f"threads, dtype {args.dtype}; LLM {SHAPES[args.shape]}")
    print(f"prompt {n} text tokens, {new} new tokens, greedy, cached; medians of {args.rounds} alternating rounds")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        ids = rng.randint(0, SHAPES[args.shape]["vocab_size"] - 1, (batch, n)).astype(np.int32)
        # the first 16 tokens stand for the system turn (no learner reads them)
        text_mask = np.arange(n) >= 16
        prompts = [Prompt(row, np.arange(n, dtype=np.int32), text_mask, np.zeros((0, 1, 1, 3), np.float32),
                          np.zeros(0, bool)) for row in ids]
        torch_ids = torch.tensor(ids, dtype=torch.long)

        def hf_generate(k):
            with torch.no_grad():
                return hf.generate(torch_ids, attention_mask=torch.ones_like(torch_ids), max_new_tokens=k,
                                   min_new_tokens=k, do_sample=False, pad_token_id=0)

        def ours(block):
            def run(k):
                engine.steps_per_dispatch = block
                return engine.generate(prompts, k)
            return run

        blocks = [int(b) for b in args.steps_per_dispatch.split(",")]
        runs = {f"ours/{b}": ours(b) for b in blocks}
        runs["recompute"] = lambda k: engine.generate(prompts, k, recompute=True)
        if not args.no_transformers:
            runs["transformers"] = hf_generate
        counts = {name: (1, new) for name in runs}
        counts["recompute"] = (args.recompute_tokens,)
        for name, run in runs.items():  # compile / warm up every shape
            for k in counts[name]:
                run(k)
        times: dict[tuple[str, int], list[float]] = {}
        for _ in range(args.rounds):
            for name, run in runs.items():
                for k in counts[name]:
                    times.setdefault((name, k), []).append(timed(lambda: run(k)))
        med = {key: statistics.median(v) for key, v in times.items()}
        decode = {}
        for name in runs:
            if name == "recompute":
                continue
            first, total = med[(name, 1)], med[(name, new)]
            decode[name] = batch * (new - 1) / max(total - first, 1e-9)
            print(f"batch {batch} {name:>12}: time to first token {first * 1e3:8.1f} ms, prefill "
                  f"{batch * n / first:8.1f} tok/s, decode {decode[name]:8.1f} tok/s "
                  f"({(total - first) / (new - 1) * 1e3:6.2f} ms/step)")
        recompute = med[("recompute", args.recompute_tokens)]
        print(f"batch {batch} {'recompute':>12}: {batch * args.recompute_tokens / recompute:8.1f} tok/s "
              f"({recompute / args.recompute_tokens * 1e3:7.1f} ms/step, wings_jax recompute=True)")
        if "transformers" in decode:
            for b in blocks:
                print(f"batch {batch} decode ratio wings_jax ({b} steps per dispatch) / transformers: "
                      f"{decode[f'ours/{b}'] / decode['transformers']:.2f}")


if __name__ == "__main__":
    main()
