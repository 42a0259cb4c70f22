"""Model FLOPs of a Wings training step, counted per component, and accelerator peak figures.

A multiply-add counts as 2 FLOPs. Training costs, per component:
- forward: F;
- backward: activation gradients (F) wherever a trainable parameter lies upstream, plus weight
  gradients (F) for the component's own trainable matmuls; attention scores cost 2F backward.
The vision tower is frozen and cut from the graph: forward only. Counts use the padded shapes
the hardware computes (batch x max_len, all image slots); with the loss over labelled positions only
(``loss_positions``), the LM head counts those slots per row (a batch whose rows hold more labelled
positions runs the head over every position, which the count does not follow).
"""
from __future__ import annotations

import dataclasses
from typing import Iterable

import jax

from wings_jax.model.wings import WingsModelConfig

COMPONENTS = ("llm", "attention", "learners", "router", "projector", "vision")

# Dense bf16 peak FLOP/s per chip, by substrings of jax's device_kind (lower case).
PEAK_FLOPS = (
    ("h200", 989e12),
    ("h100", 989e12),
    ("a100", 312e12),
    ("l4", 121e12),
    ("v6", 918e12),  # TPU v6e (Trillium)
    ("v5p", 459e12),
    ("v5 lite", 197e12),  # TPU v5e reports "TPU v5 lite"
    ("v5e", 197e12),
    ("v4", 275e12),
    ("tpu v5", 459e12),  # libtpu names v5p "TPU v5"; after the v5e entries, which it would also match
)


def peak_flops_per_device(device: jax.Device | None = None) -> float | None:
    """Dense bf16 peak of ``device`` (default: the first one); None where unknown (e.g. CPU)."""
    kind = (device or jax.devices()[0]).device_kind.lower()
    for key, value in PEAK_FLOPS:
        if key in kind:
            return value
    return None


def mfu(flops_per_step: float, step_seconds: float | None, peak_per_device: float | None, devices: int) -> float | None:
    """Model FLOPs utilisation: the step's model FLOPs per second over the peak of all ``devices``; None when the
    step time or the peak is unknown."""
    if not step_seconds or not peak_per_device:
        return None
    return flops_per_step / (step_seconds * peak_per_device * devices)


@dataclasses.dataclass(frozen=True)
class FlopCount:
    forward: dict[str, float]
    training: dict[str, float]

    @property
    def training_total(self) -> float:
        return sum(self.training.values())


def _forward(cfg: WingsModelConfig, seq_len: int, images_per_row: int, loss_positions: int) -> dict[str, float]:
    """Forward FLOPs of one row of ``seq_len`` tokens with ``images_per_row`` image slots, the LM head over
    ``loss_positions`` of them (0: all)."""
    llm, w = cfg.llm, cfg.wings
    h, t, layers = llm.hidden_size, seq_len, llm.num_layers
    q_dim, kv_dim = llm.num_heads * llm.head_dim, llm.num_kv_heads * llm.head_dim
    per_token = 2 * h * (q_dim + 2 * kv_dim) + 2 * q_dim * h + 2 * 3 * h * llm.intermediate_size
    out = {
        "llm": t * layers * per_token + (loss_positions or t) * 2 * h * llm.vocab_size,
        # causal QK^T and PV: half of 2 * 2 * t * t * heads * head_dim
        "attention": layers * 2 * t * t * q_dim,
        "router": 0.0, "projector": 0.0, "vision": 0.0,
    }
    learner_layers = sum(w.layer_flags(layers))
    image_tokens = images_per_row * cfg.tokens_per_image
    low_rank = 2 * 2 * h * w.lora_rank  # x A then (x A) B
    visual = t * 2 * low_rank + image_tokens * 2 * low_rank + 2 * 2 * t * image_tokens * h
    out["learners"] = learner_layers * visual
    if w.uses_router:
        textual = t * 4 * low_rank + 2 * t * t * h  # q, o, k, v projections; causal attention
        out["learners"] += learner_layers * textual
        out["router"] = learner_layers * 2 * t * t * llm.num_heads * 2  # 2 extra value channels, causal
    if cfg.vision is not None and images_per_row:
        v = cfg.vision
        patches = v.num_positions
        per_patch = v.num_layers * (2 * 4 * v.hidden_size ** 2 + 2 * 2 * v.hidden_size * v.intermediate_size
                                    + 2 * 2 * patches * v.hidden_size)
        per_patch += 2 * v.patch_size ** 2 * v.num_channels * v.hidden_size
        out["vision"] = images_per_row * patches * per_patch
        second = 2 * h * h if cfg.projector == "mlp2x_gelu" else 0
        out["projector"] = image_tokens * (2 * v.hidden_size * h + second)
    return out


def count_flops(cfg: WingsModelConfig, *, batch: int, seq_len: int, images_per_row: int,
                trainable: Iterable[str], loss_positions: int = 0) -> FlopCount:
    """FLOPs of one forward and one training step; ``trainable`` names components from COMPONENTS
    ('llm' covers its weights, 'learners' the learners and routers, 'projector'); ``loss_positions`` as
    ``train.loss_positions`` (0: the LM head over every position)."""
    trainable = set(trainable)
    unknown = trainable - set(COMPONENTS)
    if unknown:
        raise ValueError(f"unknown components {sorted(unknown)}; choose from {COMPONENTS}")
    fwd = {k: batch * v for k, v in _forward(cfg, seq_len, images_per_row, loss_positions).items()}
    # Gradients flow from the loss down to the lowest trainable component: the projector sits
    # below every layer, the learners below all but the top layers (counted as all).
    grads_flow = bool(trainable & {"llm", "learners", "projector"})
    train = {}
    for name, value in fwd.items():
        if name == "vision":
            train[name] = value  # frozen and cut from the graph
        elif name in ("attention", "router"):
            train[name] = value * (3 if grads_flow else 1)
        else:
            train[name] = value * (1 + grads_flow + (name in trainable))
    return FlopCount(forward=fwd, training=train)
