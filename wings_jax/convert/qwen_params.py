"""Hugging Face Qwen2 <-> wings_jax: config fields and tensor names."""
from __future__ import annotations

from typing import Any, Mapping

from wings_jax.convert.hf_io import ConversionError, SafetensorsReader, read_config, rope_theta_of, rope_type_of
from wings_jax.convert.mapping import BIAS, COPY, LINEAR, TensorRule, import_tensors
from wings_jax.model.qwen import QwenConfig, Qwen2
from wings_jax.model.runtime import Runtime
from wings_jax.params import abstract_model, materialize, param_shapes

QWEN_MODEL_TYPES = ("qwen2",)


def qwen_config_from_hf(hf: Mapping[str, Any], source: str = "config.json", model_types=QWEN_MODEL_TYPES) -> QwenConfig:
    """Reads a transformers Qwen2 config (v4 or v5 style); refuses options this implementation lacks."""
    model_type = hf.get("model_type")
    if model_type not in model_types:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not supported here; expected one of {', '.join(model_types)}"
        )
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not implemented; only full attention is supported")
    other_layers = sorted(set(hf.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if other_layers:
        raise ConversionError(f"{source}: layer_types {other_layers} are not implemented; only full attention is supported")
    if rope_type_of(hf) != "default":
        raise ConversionError(f"{source}: rope type {rope_type_of(hf)!r} is not implemented; only default RoPE is supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {hf.get('hidden_act')!r} is not supported; Qwen2 uses silu")
    if float(hf.get("attention_dropout", 0.0) or 0.0) != 0.0:
        raise ConversionError(f"{source}: attention_dropout must be 0 (dropout is not implemented)")
    required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
    absent = [k for k in required if k not in hf]
    if absent:
        raise ConversionError(f"{source}: missing fields {', '.join(absent)}")
    heads = int(hf["num_attention_heads"])
    return QwenConfig(
        vocab_size=int(hf["vocab_size"]),
        hidden_size=int(hf["hidden_size"]),
        intermediate_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=int(hf.get("head_dim") or 0),
        rope_theta=rope_theta_of(hf, 10000.0),
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        max_position_embeddings=int(hf.get("max_position_embeddings", 32768)),
    )


def qwen_config_to_hf(cfg: QwenConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``Qwen2Config`` dict (both the v4 and the v5 rope fields are written)."""
    return {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_key_value_heads": cfg.num_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_position_embeddings,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default"},
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "use_sliding_window": False,
        "attention_dropout": 0.0,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def qwen_rules(cfg: QwenConfig, prefix: str = "") -> list[TensorRule]:
    """Rules for a Qwen2ForCausalLM; ``prefix`` is our path of the Qwen2 module (e.g. 'llm/')."""
    p, layer = prefix, "model.layers.{i}."
    rules = [
        TensorRule("model.embed_tokens.weight", p + "embed/embedding", COPY),
        TensorRule("model.norm.weight", p + "final_norm/scale", COPY),
        TensorRule(layer + "input_layernorm.weight", p + "layers/input_norm/scale", COPY),
        TensorRule(layer + "post_attention_layernorm.weight", p + "layers/post_norm/scale", COPY),
        TensorRule(layer + "self_attn.o_proj.weight", p + "layers/attn/o/kernel", LINEAR, num_in=2),
        TensorRule(layer + "mlp.gate_proj.weight", p + "layers/mlp/gate/kernel", LINEAR),
        TensorRule(layer + "mlp.up_proj.weight", p + "layers/mlp/up/kernel", LINEAR),
        TensorRule(layer + "mlp.down_proj.weight", p + "layers/mlp/down/kernel", LINEAR),
    ]
    for name in "qkv":
        rules.append(TensorRule(layer + f"self_attn.{name}_proj.weight", p + f"layers/attn/{name}/kernel", LINEAR))
        rules.append(TensorRule(layer + f"self_attn.{name}_proj.bias", p + f"layers/attn/{name}/bias", BIAS))
    if not cfg.tie_word_embeddings:
        rules.append(TensorRule("lm_head.weight", p + "lm_head/kernel", LINEAR))
    return rules


# Tensors a Qwen2 checkpoint may hold that carry no weights (rotary caches of old exports).
QWEN_IGNORED = ("model.layers.*.self_attn.rotary_emb.inv_freq",)


def load_qwen_values(directory: str, prefix: str = "") -> tuple[QwenConfig, dict]:
    """Reads a Hugging Face Qwen2 directory (safetensors only) into our layout: its config and
    ``{prefix + path: array}``."""
    hf = read_config(directory)
    cfg = qwen_config_from_hf(hf, source=f"{directory}/config.json")
    reader = SafetensorsReader(directory)
    ignored = QWEN_IGNORED + (("lm_head.weight",) if cfg.tie_word_embeddings else ())
    shapes = param_shapes(abstract_model(lambda rngs: Qwen2(cfg, Runtime(), rngs=rngs)))  # a runtime changes no shape
    values = import_tensors(
        reader, qwen_rules(cfg, prefix), {prefix + k: v for k, v in shapes.items()}, ignore=ignored, desc="qwen2",
    )
    return cfg, values


def load_qwen(directory: str, runtime: Runtime = Runtime()) -> Qwen2:
    """Builds a :class:`Qwen2` from a Hugging Face Qwen2 directory (safetensors only)."""
    cfg, values = load_qwen_values(directory)
    return materialize(lambda rngs: Qwen2(cfg, runtime, rngs=rngs), values)
