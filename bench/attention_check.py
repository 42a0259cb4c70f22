"""Attention backends on this machine: cuDNN / dot_product against the chunked XLA path, and their speed.

    python bench/attention_check.py

Checks, for the Wings main-attention case (causal, router channels) in bfloat16 on two row layouts,
that every available implementation agrees with the "xla" one (max abs difference of outputs and router
sums), then times forward + backward of each at 2048 tokens. Layouts: "packed" (a row of two segments
and padding: the jax.nn paths take a dense mask) and "padded" (one sequence per row, right padding: they
take the mask as structure, ``attend(rows="padded", causal_by_index=True)``).
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

from wings_jax.model.attention import attend


def inputs(rows, b=2, t=2048, n=16, kv=16, d=128, dtype=jnp.bfloat16):
    ks = jax.random.split(jax.random.key(0), 4)
    q = jax.random.normal(ks[0], (b, t, n, d), dtype)
    k = jax.random.normal(ks[1], (b, t, kv, d), dtype)
    v = jax.random.normal(ks[2], (b, t, kv, d), dtype)
    extra = jax.random.normal(ks[3], (b, t, 2), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    second = jnp.where(jnp.arange(t) < t // 2, 1, jnp.where(jnp.arange(t) < t - 100, 2, 0)) if rows == "packed" \
        else jnp.where(jnp.arange(t) < t - 100, 1, 0)
    seg = jnp.concatenate([jnp.ones((1, t), jnp.int32), second[None]])
    return q, k, v, extra, pos, seg


def run(implementation, rows, q, k, v, extra, pos, seg):
    return attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, extra_values=extra,
                  implementation=implementation, rows=rows, causal_by_index=True)


def main() -> None:
    print(f"device {jax.devices()[0].device_kind}; bf16, batch 2 x 2048, 16 heads x 128, causal + router")
    for rows in ("packed", "padded"):
        check(rows)


def check(rows: str) -> None:
    args = inputs(rows)
    reference = jax.jit(lambda *a: run("xla", rows, *a))(*args)
    valid = args[-1] != 0
    print(f"rows {rows}:")
    for implementation in ("xla", "dot_product", "cudnn"):
        try:
            out, router = jax.jit(lambda *a, i=implementation: run(i, rows, *a))(*args)
        except Exception as e:  # noqa: BLE001 - report what this backend cannot do
            print(f"{implementation:12s} unavailable: {type(e).__name__}: {str(e).splitlines()[0][:150]}")
            continue
        d_out = jnp.abs(out.astype(jnp.float32) - reference[0].astype(jnp.float32))[valid].max()
        d_router = jnp.abs(router - reference[1])[valid].max()

        def loss(q, k, v, i=implementation):
            o, r = run(i, rows, q, k, v, *args[3:])
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(r)

        step = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
        jax.block_until_ready(step(*args[:3]))
        start = time.perf_counter()
        for _ in range(10):
            jax.block_until_ready(step(*args[:3]))
        ms = (time.perf_counter() - start) / 10 * 1e3
        print(f"{implementation:12s} max|out - xla| {float(d_out):.4f}  max|router - xla| {float(d_router):.4f}  "
              f"forward+backward {ms:.2f} ms")


if __name__ == "__main__":
    main()
