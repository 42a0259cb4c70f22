"""Trainable parameter groups and the optimizer.

``optim.groups`` names groups of parameters by regular expressions over their '/'-paths, each with
its own peak learning rate. A parameter in no group is frozen: it gets no gradient computation and
no optimizer state. Groups must not overlap.
"""
from __future__ import annotations

import re
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from wings_jax.params import path_str

SCHEDULES = ("cosine", "linear", "constant")


class GroupError(ValueError):
    """Parameter groups that cannot be used."""


def assign_groups(param_paths: list[str], groups: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """path -> group name for every trainable parameter; raises on overlaps and empty groups."""
    compiled = {}
    for name, group in groups.items():
        try:
            compiled[name] = re.compile(group["pattern"])
        except re.error as e:
            raise GroupError(f"optim.groups.{name}.pattern {group['pattern']!r} is not a valid regex: {e}") from None
    owner, overlaps = {}, []
    for path in param_paths:
        hits = [name for name, rx in compiled.items() if rx.search(path)]
        if len(hits) > 1:
            overlaps.append(f"{path} ({', '.join(hits)})")
        elif hits:
            owner[path] = hits[0]
    if overlaps:
        raise GroupError("parameters in more than one optim.groups entry (make the patterns disjoint): "
                         + "; ".join(overlaps[:10]) + (" ..." if len(overlaps) > 10 else ""))
    empty = sorted(set(groups) - set(owner.values()))
    if empty:
        raise GroupError(f"optim.groups {empty} match no parameter; check their patterns against the model's "
                         "parameter paths (e.g. llm/layers/attn/q/kernel, llm/layers/side/visual/q_a, projector/fc1/kernel)")
    return owner


def trainable_filter(owner: Mapping[str, str]):
    """An nnx filter selecting the parameters that belong to some group."""
    return lambda path, value: isinstance(value, nnx.Param) and path_str(path) in owner


def schedule(peak: float, total_steps: int, warmup_ratio: float, kind: str) -> optax.Schedule:
    if kind not in SCHEDULES:
        raise GroupError(f"optim.schedule={kind!r}; choose one of {SCHEDULES}")
    warmup = int(round(warmup_ratio * total_steps))
    decay_steps = max(total_steps - warmup, 1)
    if kind == "cosine":
        after = optax.cosine_decay_schedule(peak, decay_steps)
    elif kind == "linear":
        after = optax.linear_schedule(peak, 0.0, decay_steps)
    else:
        after = optax.constant_schedule(peak)
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


def make_optimizer(trainable: Any, owner: Mapping[str, str], optim: Mapping[str, Any],
                   total_steps: int) -> tuple[optax.GradientTransformation, dict[str, optax.Schedule]]:
    """AdamW per group (own schedule), global-norm clipping across all groups; no decay on vectors.

    ``trainable`` is the pure pytree (nested dict of arrays or shapes) the optimizer will update.
    """
    schedules = {name: schedule(g["lr"], total_steps, optim["warmup_ratio"], optim["schedule"])
                 for name, g in optim["groups"].items()}
    labels = jax.tree_util.tree_map_with_path(lambda path, _: owner[path_str(path)], trainable)
    # biases and norm scales (1-D) are not decayed, as in transformers' Trainer
    decay_mask = jax.tree.map(lambda leaf: len(leaf.shape) > 1, trainable)
    per_group = {
        name: optax.adamw(schedules[name], b1=optim["b1"], b2=optim["b2"], eps=optim["eps"],
                          weight_decay=optim["weight_decay"], mask=decay_mask)
        for name in optim["groups"]
    }
    chain = [optax.multi_transform(per_group, labels)]
    if optim["clip_norm"] > 0:
        chain.insert(0, optax.clip_by_global_norm(optim["clip_norm"]))
    return optax.chain(*chain), schedules


def learning_rates(schedules: Mapping[str, optax.Schedule], step: jax.Array) -> dict[str, jax.Array]:
    return {name: jnp.asarray(fn(step), jnp.float32) for name, fn in schedules.items()}
