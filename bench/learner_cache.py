"""The textual learner's decode cache layouts (``runtime.text_cache``) side by side: cache memory and step time.

    python bench/learner_cache.py [--tokens 4096] [--rounds 5] [--step-layers 2] [--dtype float32]

Memory: a Qwen2.5-7B-shaped Wings model (hidden 3584, 28 layers, 28 heads, 4 KV heads, head_dim 128, MLP 18944,
learners of rank 64, bf16) with the SigLIP so400m tower, batch 1: the cache a prefill of ``--tokens`` prompt
tokens (one 729-token image among them) allocates for ``--tokens`` slots, each buffer's exact nbytes from
``jax.eval_shape`` of the prefill at full depth (nothing allocated). The image learner's caches are full-head in
both layouts; their low-rank form (the image features once, 2 rank values per image token per layer) is not
built, so its size is computed from those shapes.

Step time: a greedy cached decode step of batch 1 after a prefill of ``--tokens`` random text tokens, timed
inside a block of 16 steps on device; the layouts alternate block by block for ``--rounds`` blocks each (after
a compiling one) and each figure is the median. Models, the same weights for both layouts: the 7B widths above
with ``--step-layers`` layers and a vocab of 1024 (what a 24 GiB CPU host holds; reported per layer-step too),
and bench/decode.py's shape (vocab 16000, 512 wide, MLP 1408, 8 layers, 8 heads) with 8 and with 2 KV heads.
"""
from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from wings_jax.data.assemble import Prompt
from wings_jax.inference import Engine, Sampling, pad_prompts
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import TEXT_CACHES, Runtime
from wings_jax.model.siglip import SiglipConfig
from wings_jax.model.wings import WingsModel, WingsModelConfig

BLOCK, SYSTEM = 16, 16  # decode steps per timed block; prompt tokens standing for the system turn
QWEN25_7B = QwenConfig(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_layers=28, num_heads=28,
                       num_kv_heads=4, max_position_embeddings=32768)
SO400M = SiglipConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26,
                      num_heads=16)
DECODE_PY = QwenConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                       num_kv_heads=8, max_position_embeddings=4096)
WINGS = WingsConfig(stage="finetune", lora_rank=64, router_max_len=8192)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--step-layers", type=int, default=2)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="of the step timings")
    return parser.parse_args(argv)


def cache_bytes(tokens: int, text_cache: str) -> dict[str, int]:
    """nbytes of the 7B-shaped model's prefill cache (bf16, full depth, batch 1), by group."""
    cfg = WingsModelConfig(llm=QWEN25_7B, vision=SO400M, wings=WINGS)
    rt = Runtime(dtype="bfloat16", param_dtype="bfloat16", text_cache=text_cache)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: WingsModel(cfg, rt, rngs=nnx.Rngs(0))))
    image_tokens = cfg.tokens_per_image
    tokens_row = np.arange(tokens, dtype=np.int32) % 1000
    tokens_row[SYSTEM:SYSTEM + image_tokens] = IMAGE_TOKEN_ID
    batch = {"tokens": tokens_row[None], "positions": np.arange(tokens, dtype=np.int32)[None],
             "segment_ids": np.ones((1, tokens), np.int32), "text_mask": (np.arange(tokens) >= SYSTEM)[None],
             "images": np.zeros((1, 1, 384, 384, 3), np.uint8), "image_mask": np.ones((1, 1), bool)}
    _, cache = jax.eval_shape(lambda state: nnx.merge(graphdef, state).prefill(batch, tokens), state)
    groups = {"main k/v": ("k", "v"), "textual learner": ("text_k", "text_v", "text_low", "text_feats"),
              "image learner": ("image_k", "image_v")}
    arrays = {**cache.layers, **cache.learners}
    return {group: sum(arrays[n].size * arrays[n].dtype.itemsize for n in names if n in arrays)
            for group, names in groups.items()}


def low_rank_image_bytes() -> int:
    """The image caches' low-rank form for one so400m image on the 7B shape, bf16: features (729, H) once and
    (layers, 729, 2 rank)."""
    m = (SO400M.image_size // SO400M.patch_size) ** 2
    return 2 * (m * QWEN25_7B.hidden_size + QWEN25_7B.num_layers * m * 2 * WINGS.lora_rank)


def step_times(llm: QwenConfig, tokens: int, rounds: int, dtype: str) -> dict[str, float]:
    """Median ms per decode step of each layout, alternating blocks."""
    engines = {layout: Engine(WingsModel(WingsModelConfig(llm=llm, vision=None, wings=WINGS),
                                         Runtime(dtype=dtype, param_dtype=dtype, text_cache=layout),
                                         rngs=nnx.Rngs(0))) for layout in TEXT_CACHES}
    ids = np.random.RandomState(0).randint(0, llm.vocab_size - 1, tokens).astype(np.int32)
    prompt = Prompt(ids, np.arange(tokens, dtype=np.int32), np.arange(tokens) >= SYSTEM,
                    np.zeros((0, 1, 1, 3), np.float32), np.zeros(0, bool))
    lengths, settings, key = np.full(1, tokens, np.int32), Sampling().values(), jax.random.key(0)
    state = {}
    for layout, engine in engines.items():
        tokens_out, cache = engine._steps.prefill(engine.state, pad_prompts([prompt], tokens), lengths, key,
                                                  settings, max_length=tokens + BLOCK * (rounds + 1))
        state[layout] = (tokens_out, cache, jnp.asarray(lengths))
    times: dict[str, list[float]] = {layout: [] for layout in engines}
    for _ in range(rounds + 1):  # the first block of each compiles
        for layout, engine in engines.items():
            tokens_out, cache, positions = state[layout]
            start = time.perf_counter()
            out, _, tokens_out, cache, positions, *_ = engine._steps.extend_block(
                engine.state, cache, tokens_out, positions, jnp.int32(1), jnp.zeros(1, bool), key, settings,
                jnp.asarray([-1]), np.int32(BLOCK), block=BLOCK)
            out.block_until_ready()
            times[layout].append((time.perf_counter() - start) / BLOCK * 1e3)
            state[layout] = (tokens_out, cache, positions)
    return {layout: statistics.median(t[1:]) for layout, t in times.items()}


def main(argv=None) -> None:
    args = parse_args(argv)
    if args.tokens <= SYSTEM + (SO400M.image_size // SO400M.patch_size) ** 2:
        raise SystemExit(f"--tokens {args.tokens} does not hold the system turn and one 729-token image")
    mib = 2 ** 20
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), {jax.device_count()} device(s)")
    print(f"cache memory, Qwen2.5-7B shape (28 layers, 28 heads, 4 KV heads, rank 64), bf16, batch 1, "
          f"{args.tokens} slots, one 729-token image (jax.eval_shape of prefill at full depth):")
    for layout in TEXT_CACHES:
        sizes = cache_bytes(args.tokens, layout)
        print(f"  text_cache={layout:8}: " + ", ".join(f"{k} {v / mib:,.1f} MiB" for k, v in sizes.items()))
    print(f"  image learner in low-rank form (not built; from its shapes): {low_rank_image_bytes() / mib:,.1f} MiB")
    shapes = {f"7B widths, {args.step_layers} layers, vocab 1024": dataclasses.replace(
                  QWEN25_7B, num_layers=args.step_layers, vocab_size=1024),
              "decode.py shape, MHA": DECODE_PY,
              "decode.py shape, GQA (2 KV heads)": dataclasses.replace(DECODE_PY, num_kv_heads=2)}
    print(f"decode step, batch 1, {args.tokens}-token prompt, dtype {args.dtype}, medians of {args.rounds} "
          f"alternating {BLOCK}-step blocks:")
    for name, llm in shapes.items():
        ms = step_times(llm, args.tokens, args.rounds, args.dtype)
        extra = (ms["low_rank"] - ms["full"]) / llm.num_layers
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f} ms/step" for k, v in ms.items())
              + f"; low_rank / full {ms['low_rank'] / ms['full']:.2f}, low_rank - full {extra:+.2f} ms per layer-step")


if __name__ == "__main__":
    main()
