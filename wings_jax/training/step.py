"""The jitted training step: micro-batched gradient accumulation over the trainable parameters only."""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wings_jax.sharding import Rules, activation_sharding
from wings_jax.training.loss import chunked_cross_entropy, next_token_targets
from wings_jax.training.metrics import LEARNING_RATE_PREFIX
from wings_jax.training.optimizer import learning_rates


def to_micro_batches(x: jax.Array, accum: int) -> jax.Array:
    """(B, ...) -> (accum, B // accum, ...) taking every accum-th row, so a device's contiguous block
    of rows splits evenly across the micro-batches (no data moves between devices)."""
    return jnp.swapaxes(x.reshape(x.shape[0] // accum, accum, *x.shape[1:]), 0, 1)


def make_train_step(
    graphdef: nnx.GraphDef, tx: optax.GradientTransformation, schedules: Mapping[str, optax.Schedule], *,
    grad_accum: int, loss_chunk: int, mesh: jax.sharding.Mesh, rules: Rules, loss_positions: int = 0,
    loss_logits_dtype: str = "float32",
) -> Callable:
    """``step(trainable, frozen, opt_state, step_number, batch) -> (trainable, opt_state, metrics)``.

    ``trainable`` / ``frozen`` are pure parameter pytrees; only ``trainable`` is differentiated.
    ``loss_*`` are :func:`~wings_jax.training.loss.chunked_cross_entropy`'s chunk, positions and logits dtype.
    """

    def loss_sum(trainable, frozen, batch, targets, weights):
        model = nnx.merge(graphdef, trainable, frozen)
        hidden = model.hidden_states(batch)
        return chunked_cross_entropy(hidden, model.llm.output_kernel(), targets, weights, loss_chunk,
                                     positions=loss_positions, logits_dtype=loss_logits_dtype)

    def step(trainable, frozen, opt_state, step_number, batch):
        with activation_sharding(mesh, rules):
            targets, weights = next_token_targets(batch["labels"], batch["segment_ids"])
            count = jnp.maximum(jnp.sum(weights), 1.0)  # a batch whose answers were all truncated trains nothing
            inputs = {k: v for k, v in batch.items() if k != "labels"}
            grad_fn = jax.value_and_grad(loss_sum)
            if grad_accum == 1:  # no float32 accumulation buffer, no scan
                total, grads = grad_fn(trainable, frozen, inputs, targets, weights)
            else:
                micro = jax.tree.map(lambda a: to_micro_batches(a, grad_accum), (inputs, targets, weights))

                def accumulate(carry, xs):
                    total, grads = carry
                    value, g = grad_fn(trainable, frozen, *xs)
                    return (total + value, jax.tree.map(jnp.add, grads, g)), None

                zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), trainable)
                (total, grads), _ = jax.lax.scan(accumulate, (jnp.zeros((), jnp.float32), zeros), micro)
            grads = jax.tree.map(lambda g, p: (g / count).astype(p.dtype), grads, trainable)
            updates, opt_state = tx.update(grads, opt_state, trainable)
            trainable = optax.apply_updates(trainable, updates)
            metrics = {
                "loss": total / count,
                "grad_norm": optax.global_norm(grads),
                "tokens": jnp.sum(batch["segment_ids"] != 0),
                **{f"{LEARNING_RATE_PREFIX}{k}": v for k, v in learning_rates(schedules, step_number).items()},
            }
        return trainable, opt_state, metrics

    return step
