"""Tiny Wings models: fresh wings_jax models and random checkpoints in the released original layout."""
from __future__ import annotations

import dataclasses
import json
import os
import zlib

import numpy as np
import torch
from safetensors.torch import save_file
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

import jax
import jax.numpy as jnp
from flax import nnx

from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig
from wings_jax.model.wings import WingsModel, WingsModelConfig

TINY_LLM = QwenConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
                      rope_theta=10000.0)
TINY_MHA_LLM = dataclasses.replace(TINY_LLM, num_kv_heads=TINY_LLM.num_heads)
TINY_VISION = SiglipConfig(image_size=28, patch_size=14, hidden_size=24, intermediate_size=48, num_layers=2,
                           num_heads=2)  # 4 tokens per image


def tiny_model(stage="finetune", runtime=Runtime(), seed=0, randomize_b=True, llm=TINY_LLM, **wings) -> WingsModel:
    """A fresh tiny Wings model (GQA base unless ``llm``); ``randomize_b`` makes every learner output non-zero."""
    cfg = WingsModelConfig(llm=llm, vision=TINY_VISION,
                           wings=WingsConfig(stage=stage, lora_rank=8, router_max_len=128, **wings))
    model = WingsModel(cfg, runtime, rngs=nnx.Rngs(seed))
    if randomize_b:
        randomize_learner_b(model, seed)
    return model


def strong_model(stage="finetune", runtime=Runtime(), llm=TINY_LLM, **wings) -> WingsModel:
    """A tiny model whose learners move the logits enough to change greedy choices (A as large as B)."""
    model = tiny_model(stage=stage, runtime=runtime, seed=3, llm=llm, **wings)
    for learner in (model.llm.layers.side.visual, model.llm.layers.side.textual):
        for name in "qkvo":
            param = getattr(learner, f"{name}_a")
            param.set_value(param.get_value() * 15)
    return model


def randomize_learner_b(model: WingsModel, seed: int = 0, scale: float = 0.3) -> None:
    key = jax.random.key(seed + 1000)
    for learner in (model.llm.layers.side.visual, model.llm.layers.side.textual):
        for name in "qkvo":
            key, sub = jax.random.split(key)
            param = getattr(learner, f"{name}_b")
            param.set_value(scale * jax.random.normal(sub, param.get_value().shape))


def make_batch(rows, tokens_per_image, image_size, max_len, max_images=2, seed=0):
    """rows: list of lists of items, each an int token or "img"; the first 3 tokens are the 'system turn'."""
    b = len(rows)
    batch = {
        "tokens": np.zeros((b, max_len), np.int32), "positions": np.zeros((b, max_len), np.int32),
        "segment_ids": np.zeros((b, max_len), np.int32), "text_mask": np.zeros((b, max_len), bool),
        "labels": np.full((b, max_len), -100, np.int32),
        "images": np.zeros((b, max_images, image_size, image_size, 3), np.float32),
        "image_mask": np.zeros((b, max_images), bool),
    }
    for r, items in enumerate(rows):
        # a row's pixels depend only on its own items, not on where it sits in the batch
        rng = np.random.RandomState((seed + zlib.crc32(repr(items).encode())) % 2**31)
        ids, n_img = [], 0
        for item in items:
            if item == "img":
                ids += [IMAGE_TOKEN_ID] * tokens_per_image
                batch["images"][r, n_img] = rng.uniform(-1, 1, (image_size, image_size, 3))
                batch["image_mask"][r, n_img] = True
                n_img += 1
            else:
                ids.append(item)
        n = len(ids)
        batch["tokens"][r, :n] = ids
        batch["positions"][r, :n] = np.arange(n)
        batch["segment_ids"][r, :n] = 1
        batch["text_mask"][r, 3:n] = np.asarray(ids[3:]) != IMAGE_TOKEN_ID
        batch["labels"][r, :n] = np.where(np.asarray(ids) == IMAGE_TOKEN_ID, -100, ids)
    return batch


# ---------------------------------------------------------------------------------------------
# The released original layout

def make_released_checkpoint(directory, *, router=True, dtype=torch.bfloat16, image_size=56, patch=14,
                             learner_layers=None, seed=0, vocab=96, vision_layers=2):
    """Writes a random checkpoint in the released layout (config.json + model.safetensors): a 2-layer LLM and
    a tower of ``vision_layers`` kept encoder layers.

    The learners' B matrices are random (not zero), so the learners change the output.
    """
    torch.manual_seed(seed)
    llm_cfg = Qwen2Config(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, rope_theta=1_000_000.0,
                          max_position_embeddings=512, tie_word_embeddings=False)
    llm = Qwen2ForCausalLM(llm_cfg)
    state = {k: v.detach().clone() for k, v in llm.state_dict().items()}
    for k in list(state):
        if k.endswith("_proj.bias"):
            state[k].normal_(0, 0.05)
    hidden, rank, router_len = 32, 8, 256
    layers = list(range(2)) if learner_layers is None else list(learner_layers)
    for i in layers:
        for pool in ("attn_pool", "attn_t_pool"):
            for proj in "qkvo":
                state[f"model.layers.{i}.{pool}.{proj}_proj.0.weight"] = torch.randn(rank, hidden) * 0.1
                state[f"model.layers.{i}.{pool}.{proj}_proj.1.weight"] = torch.randn(hidden, rank) * 0.1
        if router:
            state[f"model.layers.{i}.reweight_module.linear.weight"] = torch.randn(2, router_len) * 0.5
            state[f"model.layers.{i}.reweight_module.linear.bias"] = torch.randn(2) * 0.5
    vision_cfg = SiglipVisionConfig(hidden_size=24, intermediate_size=40, num_hidden_layers=vision_layers + 1,
                                    num_attention_heads=2, image_size=image_size, patch_size=patch, layer_norm_eps=1e-6)
    vision = SiglipVisionModel(vision_cfg)
    for name, value in _vision_state(vision).items():
        if name.startswith(("head.", f"encoder.layers.{vision_layers}.")) or name.endswith("position_ids"):
            continue  # the released tower: last encoder layer deleted, pooling head replaced by Identity
        state["model.vision_tower.vision_tower.vision_model." + name] = value.detach().clone()
    state["model.mm_projector.0.weight"] = torch.randn(hidden, 24) * 0.2
    state["model.mm_projector.0.bias"] = torch.randn(hidden) * 0.1
    state["model.mm_projector.2.weight"] = torch.randn(hidden, hidden) * 0.2
    state["model.mm_projector.2.bias"] = torch.randn(hidden) * 0.1
    os.makedirs(directory, exist_ok=True)
    save_file({k: v.to(dtype).contiguous() for k, v in state.items()}, os.path.join(directory, "model.safetensors"),
              metadata={"format": "pt"})
    config = llm_cfg.to_dict()
    config.update({
        "model_type": "wings_qwen2", "architectures": ["WingsQwen2ForCausalLM"], "lora_dim": rank,
        "attn_layers_idx": layers, "wings_router_type": "linear" if router else "pretrain",
        "system_prompt_length": 5, "mm_projector_type": "mlp2x_gelu", "mm_vision_tower": "tiny-siglip",
        "image_token_length": (image_size // patch) ** 2, "model_max_length": 256,
        "vision_config": {"num_attention_heads": 2, "layer_norm_eps": 1e-6, "image_size": image_size,
                          "hidden_size": 24, "intermediate_size": 40, "num_hidden_layers": vision_layers,
                          "patch_size": patch,
                          "num_channels": 3},
    })
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump(config, f)
    return config


def _vision_state(vision):
    """The tower's tensors without the 'vision_model.' level that transformers 4 adds and 5 drops."""
    module = getattr(vision, "vision_model", vision)
    return module.state_dict()


def jnp_batch(batch):
    return {k: jnp.asarray(v) for k, v in batch.items()}
