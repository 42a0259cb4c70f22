"""Where a cached decode step's time goes: per-step time by cache size, with and without the Wings learners,
and the cost of sampling against a sort of the whole vocabulary.

    python bench/decode_steps.py [--shape issue] [--cache-slots 320,1280] [--batch 1]

The models are bench/decode.py's (the same imported random Qwen2, once with learners and router, once with
wings disabled). A step is timed inside one 16-step block on device (median of 3 blocks after a compiling
one); sampling is timed alone on random (batch, vocab) logits (median of 5 runs of 50 calls).
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

from decode import SHAPES, make_hf
from wings_jax.convert.wings_params import build_from_hf
from wings_jax.data.assemble import Prompt
from wings_jax.inference import Engine, Sampling, pad_prompts, sample_tokens
from wings_jax.model.learners import WingsConfig
from wings_jax.model.runtime import Runtime

BLOCK, PROMPT = 16, 256


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="issue")
    parser.add_argument("--cache-slots", default="320,1280", help="cache sizes (> 256, the prompt length)")
    parser.add_argument("--batch", type=int, default=1)
    return parser.parse_args(argv)


def step_ms(engine: Engine, batch: int, vocab: int, slots: int) -> float:
    ids = np.random.RandomState(0).randint(0, vocab - 1, (batch, PROMPT)).astype(np.int32)
    prompts = [Prompt(row, np.arange(PROMPT, dtype=np.int32), np.arange(PROMPT) >= 16,
                      np.zeros((0, 1, 1, 3), np.float32), np.zeros(0, bool)) for row in ids]
    lengths, settings, key = np.full(batch, PROMPT, np.int32), Sampling().values(), jax.random.key(0)
    steps = engine._steps
    tokens, cache = steps.prefill(engine.state, pad_prompts(prompts, PROMPT), lengths, key, settings,
                                  max_length=slots)
    times = []
    for _ in range(4):
        start = time.perf_counter()
        out, _, _, cache, *_ = steps.extend_block(engine.state, cache, tokens, jnp.asarray(lengths), jnp.int32(1),
                                                  jnp.zeros(batch, bool), key, settings, jnp.asarray([-1]),
                                                  np.int32(BLOCK), block=BLOCK)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / BLOCK)
    return statistics.median(times[1:]) * 1e3


def sorted_cutoff_sampling(logits, key, settings):
    """Top-k / top-p by sorting the whole vocabulary every call (the comparison)."""
    temperature, top_k, top_p = settings
    scaled = logits / jnp.maximum(temperature, 1e-6)
    ordered = jnp.sort(scaled, axis=-1)[:, ::-1]
    rank = jnp.arange(scaled.shape[-1])[None]
    in_top_k = rank < jnp.where(top_k > 0, top_k, scaled.shape[-1])
    probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
    keep = in_top_k & ((jnp.cumsum(probs, axis=-1) - probs < top_p) | (top_p >= 1))
    cutoff = jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)
    return jax.random.categorical(key, jnp.where(scaled < cutoff, -jnp.inf, scaled), axis=-1)


def sampling_ms(fn, logits, settings) -> float:
    fn(logits, jax.random.key(0), settings).block_until_ready()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        for i in range(50):
            out = fn(logits, jax.random.key(i), settings)
        out.block_until_ready()
        times.append((time.perf_counter() - start) / 50)
    return statistics.median(times) * 1e3


def main(argv=None) -> None:
    args = parse_args(argv)
    vocab = SHAPES[args.shape]["vocab_size"]
    with tempfile.TemporaryDirectory() as directory:
        make_hf(directory, args.shape)
        models = {name: build_from_hf(directory, None, wings, Runtime())[0] for name, wings in (
            ("learners", WingsConfig(stage="finetune", lora_rank=64, router_max_len=4096)),
            ("no wings", WingsConfig(enabled=False)))}
    print(f"device: {jax.devices()[0].device_kind}; LLM {SHAPES[args.shape]}; batch {args.batch}, "
          f"{PROMPT}-token prompt")
    for name, model in models.items():
        engine = Engine(model)
        for slots in (int(s) for s in args.cache_slots.split(",")):
            print(f"step {name:>8}, {slots:5} cache slots: {step_ms(engine, args.batch, vocab, slots):7.2f} ms")
    logits = jax.random.normal(jax.random.key(0), (args.batch, vocab)) * 3
    ours, sorting = jax.jit(sample_tokens), jax.jit(sorted_cutoff_sampling)
    for kw in (dict(top_k=50), dict(), dict(top_p=0.9)):
        settings = Sampling(temperature=1.0, **kw).values()
        print(f"sampling {kw or 'no truncation'}: {sampling_ms(ours, logits, settings):.3f} ms, "
              f"whole-vocabulary sort {sampling_ms(sorting, logits, settings):.3f} ms")


if __name__ == "__main__":
    main()
