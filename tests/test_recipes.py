"""The full-size recipes (configs/pretrain.py, configs/finetune.py; spec section 6) load, pass the run checks and
plan their sharded step on 8 devices: the model, the trained sets, the learning rates and the layouts they ship."""
import math
import os
import re

import jax
import numpy as np
import pytest

from wings_jax import sharding
from wings_jax.config import load_config
from wings_jax.params import component
from wings_jax.training.plan import plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Qwen1.5-7B-Chat: 151936 x 4096 embeddings and lm_head, 32 layers of q/k/v (with biases), o, SwiGLU 11008, 2 norms.
QWEN15_7B_PARAMS = 7_721_324_544


def _recipe(name: str):
    cfg = load_config(os.path.join(ROOT, "configs", f"{name}.py") + ":main=/data/instruct.array_record")
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    return cfg, plan(cfg, mesh)


def _sizes(tree) -> dict[str, int]:
    """Parameter path -> number of values."""
    return {"/".join(str(getattr(k, "key", k)) for k in path): math.prod(x.shape)
            for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _llm_count(tree) -> int:
    """Parameters of the Qwen2 decoder itself (learners and routers excluded)."""
    return sum(n for path, n in _sizes(tree).items() if path.startswith("llm/") and not path.startswith("llm/layers/side/"))


@pytest.mark.parametrize("name, batch, lrs", [
    ("pretrain", 256, {"projector": 2e-5, "visual": 2e-5}),
    ("finetune", 64, {"llm": 2e-6, "learners": 2e-6, "projector": 1e-5}),
])
def test_full_size_recipe_plans(name, batch, lrs):
    cfg, p = _recipe(name)
    assert p.model_cfg.wings.stage == name
    assert {g: cfg.optim.groups[g].lr for g in cfg.optim.groups} == lrs
    assert (cfg.optim.schedule, cfg.optim.warmup_ratio, cfg.optim.clip_norm) == ("cosine", 0.03, 1.0)
    assert cfg.train.global_batch_size == batch and cfg.runtime.dtype == "bfloat16"

    trainable = set(p.owner)
    assert set(_sizes(p.abstract_trainable)) == trainable
    assert not any(path.startswith("vision/") for path in trainable)
    if name == "pretrain":  # projector and visual learners; the LLM, textual learners and routers stay frozen
        assert all(path.startswith(("projector/", "llm/layers/side/visual/")) for path in trainable)
        assert _llm_count(p.abstract_frozen) == QWEN15_7B_PARAMS
    else:  # all of the LLM, both learners, routers and the projector
        assert any(path.startswith("llm/layers/side/textual/") for path in trainable)
        assert any("router" in path for path in trainable)
        assert _llm_count(p.abstract_trainable) == QWEN15_7B_PARAMS
        assert _sizes(p.abstract_frozen) and all(path.startswith("vision/") for path in _sizes(p.abstract_frozen))

    # SigLIP so400m with its last encoder layer dropped: ~400M parameters, 729 image tokens of 384 px.
    assert p.model_cfg.tokens_per_image == 729
    total = sum(_sizes(p.abstract_trainable).values()) + sum(_sizes(p.abstract_frozen).values())
    assert 3.5e8 < total - QWEN15_7B_PARAMS < 1.2e9
    images = p.batch_shapes["images"]
    assert images.shape == (batch, 1, 384, 384, 3) and images.dtype == np.uint8
    assert p.batch_shapes["tokens"].shape == (batch, 2048)

    # The layouts of docs/scaling.md: data parallel for pretrain (weights whole on every device), FSDP over all
    # chips for finetune (the embedding split 8 ways); the batch split 8 ways in both.
    embed = (p.abstract_trainable if name == "finetune" else p.abstract_frozen)["llm"]["embed"]["embedding"]
    whole = embed.sharding.shard_shape(embed.shape) == embed.shape
    assert whole if name == "pretrain" else math.prod(embed.sharding.shard_shape(embed.shape)) * 8 == math.prod(embed.shape)
    tokens = p.batch_shapes["tokens"]
    assert tokens.sharding.shard_shape(tokens.shape) == (batch // 8, 2048)

    # Model FLOPs against 6 N T of the language model's weights: about that in finetune (less the embedding
    # lookup, plus attention, tower and learners); about 4 N T in pretrain, whose frozen LLM gets no weight gradients.
    dense = 6 * QWEN15_7B_PARAMS * batch * 2048
    low, high = (0.6, 0.9) if name == "pretrain" else (0.9, 1.5)
    assert low * dense <= p.flops_per_step <= high * dense


def test_parameter_parts_are_named_once():
    """The recipes' groups and the FLOP count's components read the same path prefixes (wings_jax.params)."""
    parts = {path: component(path) for path in ("llm/layers/attn/q/kernel", "llm/layers/side/visual/q_a",
                                                 "llm/layers/side/router/weight", "projector/fc1/kernel",
                                                 "vision/layers/mlp/fc1/kernel", "llm/lm_head/kernel")}
    assert list(parts.values()) == ["llm", "learners", "learners", "projector", "vision", "llm"]
    cfg = load_config(os.path.join(ROOT, "configs", "finetune.py"))
    groups = {name: g.pattern for name, g in cfg.optim.groups.items()}
    assert {path: next(n for n, pattern in groups.items() if re.search(pattern, path))
            for path in parts if parts[path] != "vision"} == {p: c for p, c in parts.items() if c != "vision"}
