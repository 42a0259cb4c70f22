"""Compiled memory of one Wings decoder layer (forward + backward) as the sequence grows.

The router needs sum_heads(P) @ W_r. Computed inside the chunked attention (extra value channels),
the (heads, L, L) probabilities exist one query chunk at a time, so memory grows linearly with L;
``--q-chunk 0`` turns chunking off (the whole (heads, L, L) block at once) for comparison.

    python bench/router_memory.py                      # Qwen1.5-7B layer shapes, bf16, batch 1
    python bench/router_memory.py --lengths 1024 2048 --q-chunk 0

Nothing runs: the layer is lowered and compiled for this machine's backend and XLA's memory
analysis is read. Prints one line per length.
"""
from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from flax import nnx

from wings_jax.model.cache import AttentionInputs
from wings_jax.model.learners import LearnerInputs, WingsConfig, WingsDecoderLayer
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime


def layer_memory(length: int, q_chunk: int, hidden: int, heads: int, mlp: int, image_tokens: int) -> dict:
    llm = QwenConfig(vocab_size=8, hidden_size=hidden, intermediate_size=mlp, num_layers=1, num_heads=heads,
                     num_kv_heads=heads)
    rt = Runtime(dtype="bfloat16", param_dtype="bfloat16", q_chunk=q_chunk or length)
    wings = WingsConfig(stage="finetune", lora_rank=64, router_max_len=max(length, 4096))
    make = lambda: WingsDecoderLayer(llm, wings, rt, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, params = nnx.split(nnx.eval_shape(make))
    b = 1
    positions = jnp.broadcast_to(jnp.arange(length), (b, length))
    segments = jnp.ones((b, length), jnp.int32)

    def loss(params, x, image_feats):
        layer = nnx.merge(graphdef, params)
        image_pos = jnp.broadcast_to(jnp.arange(image_tokens), (b, image_tokens))
        learners = LearnerInputs(
            image_feats=image_feats, image_positions=image_pos,
            image_mask_pos=image_pos, image_segments=jnp.ones((b, image_tokens), jnp.int32),
            image_query_segments=segments, text_feats=x, text_query_mask_pos=positions,
            text_key_mask_pos=positions, text_key_segments=segments, repeats=jnp.ones((b, 2)),
        )
        y, _ = layer(x, AttentionInputs.build(positions, segments), None, learners, jnp.bool_(True))
        return jnp.sum(y.astype(jnp.float32))

    x = jax.ShapeDtypeStruct((b, length, hidden), jnp.bfloat16)
    feats = jax.ShapeDtypeStruct((b, image_tokens, hidden), jnp.bfloat16)
    compiled = jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, feats).compile()
    memory = compiled.memory_analysis()
    return {"length": length, "temp_bytes": memory.temp_size_in_bytes, "argument_bytes": memory.argument_size_in_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    parser.add_argument("--q-chunk", type=int, default=512, help="0: no chunking (quadratic)")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--mlp", type=int, default=11008)
    parser.add_argument("--image-tokens", type=int, default=729)
    args = parser.parse_args()
    print(f"backend {jax.default_backend()}; layer hidden {args.hidden}, {args.heads} heads, mlp {args.mlp}, "
          f"{args.image_tokens} image tokens, bf16, batch 1, q_chunk {args.q_chunk or 'off'}")
    previous = None
    for length in args.lengths:
        r = layer_memory(length, args.q_chunk, args.hidden, args.heads, args.mlp, args.image_tokens)
        ratio = "" if previous is None else f"  x{r['temp_bytes'] / previous:.2f} vs previous"
        print(f"L={length:6d}  temporaries {r['temp_bytes'] / 2**20:9.1f} MiB  "
              f"arguments {r['argument_bytes'] / 2**20:8.1f} MiB{ratio}")
        previous = r["temp_bytes"]


if __name__ == "__main__":
    main()
