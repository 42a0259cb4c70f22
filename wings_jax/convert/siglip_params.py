"""Hugging Face SigLIP vision tower (and the LLaVA ``mm_projector``) <-> wings_jax: configs and tensor names.

Hugging Face name prefixes of the vision tower differ by source:
- a full ``SiglipModel`` and a transformers-4 ``SiglipVisionModel``: ``vision_model.``
- a transformers-5 ``SiglipVisionModel`` (saved flat): no prefix
- the released Wings checkpoint: ``model.vision_tower.vision_tower.vision_model.``
:func:`load_siglip` finds the prefix in the directory; the rule builders take it as ``hf_prefix``.

``select_layer`` picks which encoder output is the feature, counted from the end like
``hidden_states[k]``: ``-2`` (Wings default) runs the first ``num_hidden_layers - 1`` layers and no
post-layernorm (= HF ``hidden_states[-2]``); a negative ``k`` runs ``num_hidden_layers + 1 + k``
layers; ``-1`` alone runs every layer *and* the post-layernorm (= HF ``last_hidden_state``).
"""
from __future__ import annotations

import math
import re
from typing import Any, Mapping

from wings_jax.convert.hf_io import ConversionError, SafetensorsReader, read_config
from wings_jax.convert.mapping import BIAS, CONV, COPY, LINEAR, TensorRule, import_tensors
from wings_jax.model.projector import PROJECTOR_KINDS
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig, SiglipVisionTower
from wings_jax.params import abstract_model, materialize, param_shapes

SIGLIP_MODEL_TYPES = ("siglip_vision_model", "siglip")
SUPPORTED_ACT = "gelu_pytorch_tanh"

# transformers' SiglipVisionConfig defaults: configs written by transformers 4 omit fields equal to them.
HF_VISION_DEFAULTS: dict[str, Any] = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 224,
    "patch_size": 16,
    "hidden_act": "gelu_pytorch_tanh",
    "layer_norm_eps": 1e-6,
    "attention_dropout": 0.0,
}

# What the weights cannot tell about towers that checkpoints name only by hub id (see siglip_config_from_weights).
KNOWN_TOWERS: dict[str, dict[str, Any]] = {
    "google/siglip-so400m-patch14-384": {"num_heads": 16, "layer_norm_eps": 1e-6, "image_size": 384},
}
SO400M_KNOWN = KNOWN_TOWERS["google/siglip-so400m-patch14-384"]

# Tensors of a full SiglipModel outside the vision tower.
SIGLIP_TEXT_IGNORED = ("text_model.*", "logit_scale", "logit_bias")

_PATCH = "embeddings.patch_embedding.weight"
_POSITIONS = "embeddings.position_embedding.weight"


def vision_dict(hf: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The SiglipVisionConfig fields of ``hf`` (a vision config or a full SiglipModel config), defaults filled in."""
    model_type = hf.get("model_type")
    if model_type not in SIGLIP_MODEL_TYPES:
        raise ConversionError(
            f"{source}: model_type {model_type!r} is not a SigLIP vision tower; expected one of "
            f"{', '.join(SIGLIP_MODEL_TYPES)}"
        )
    if model_type == "siglip":
        vision = hf.get("vision_config")
        if not isinstance(vision, Mapping):
            raise ConversionError(f"{source}: a 'siglip' config needs a 'vision_config' object")
        source = f"{source} (vision_config)"
    else:
        vision = hf
    merged = {**HF_VISION_DEFAULTS, **{k: v for k, v in vision.items() if v is not None}}
    if merged["hidden_act"] != SUPPORTED_ACT:
        raise ConversionError(
            f"{source}: hidden_act {merged['hidden_act']!r} is not supported; the SigLIP tower implements "
            f"{SUPPORTED_ACT!r} only"
        )
    if float(merged["attention_dropout"] or 0.0) != 0.0:
        raise ConversionError(f"{source}: attention_dropout must be 0 (dropout is not implemented)")
    for name in ("image_size", "patch_size"):
        value = merged[name]
        if isinstance(value, (list, tuple)):
            if len(value) != 2 or value[0] != value[1]:
                raise ConversionError(f"{source}: {name}={value!r}; only square images and patches are supported")
            merged[name] = value[0]
    return merged


def _kept_layers(total: int, select_layer: int, source: str) -> int:
    if not isinstance(select_layer, int) or not -total <= select_layer <= -1:
        raise ConversionError(
            f"{source}: select_layer={select_layer!r} is out of range for {total} encoder layers; use a negative "
            f"index from -1 (all layers + post_layernorm) to -{total} (-2 drops the last layer, as Wings does)"
        )
    return total if select_layer == -1 else total + 1 + select_layer


def siglip_config_from_hf(
    hf_config: Mapping[str, Any], select_layer: int = -2, source: str = "config.json"
) -> SiglipConfig:
    """A :class:`SiglipConfig` from a SiglipVisionConfig or SiglipConfig dict (see module doc for ``select_layer``)."""
    v = vision_dict(hf_config, source)
    total = int(v["num_hidden_layers"])
    image, patch = int(v["image_size"]), int(v["patch_size"])
    if image < patch:
        raise ConversionError(f"{source}: image_size={image} is smaller than patch_size={patch}")
    return SiglipConfig(
        image_size=image,
        patch_size=patch,
        hidden_size=int(v["hidden_size"]),
        intermediate_size=int(v["intermediate_size"]),
        num_layers=_kept_layers(total, select_layer, source),
        num_heads=int(v["num_attention_heads"]),
        layer_norm_eps=float(v["layer_norm_eps"]),
        num_channels=int(v["num_channels"]),
        use_post_layernorm=select_layer == -1,
    )


def siglip_config_to_hf(cfg: SiglipConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A transformers ``SiglipVisionConfig`` dict holding the layers we run (no pooling head).

    Loaded with transformers, ``hidden_states[-1]`` is our output without post-layernorm and
    ``last_hidden_state`` our output with it.
    """
    return {
        "architectures": ["SiglipVisionModel"],
        "model_type": "siglip_vision_model",
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_heads,
        "num_channels": cfg.num_channels,
        "image_size": cfg.image_size,
        "patch_size": cfg.patch_size,
        "hidden_act": SUPPORTED_ACT,
        "layer_norm_eps": cfg.layer_norm_eps,
        "attention_dropout": 0.0,
        "vision_use_head": False,
        "torch_dtype": torch_dtype,
        "dtype": torch_dtype,
    }


def siglip_rules(
    cfg: SiglipConfig, prefix: str = "", hf_prefix: str = "vision_model.", *, post_layernorm: bool = True
) -> list[TensorRule]:
    """Rules for the tower's tensors; ``prefix`` is our path of the tower (e.g. 'vision/'), ``hf_prefix`` the
    HF one. Stacked rules cover HF layers 0..cfg.num_layers-1. ``post_layernorm=False`` leaves it out
    (for checkpoints that lack it; the parameter then keeps its identity initialisation)."""
    p, h, layer = prefix, hf_prefix, hf_prefix + "encoder.layers.{i}."
    rules = [
        TensorRule(h + _PATCH, p + "patch_embed/kernel", CONV),
        TensorRule(h + "embeddings.patch_embedding.bias", p + "patch_embed/bias", BIAS),
        TensorRule(h + _POSITIONS, p + "position_embedding", COPY),
    ]
    for ours, theirs in (("norm1", "layer_norm1"), ("norm2", "layer_norm2")):
        rules.append(TensorRule(layer + f"{theirs}.weight", p + f"layers/{ours}/scale", COPY))
        rules.append(TensorRule(layer + f"{theirs}.bias", p + f"layers/{ours}/bias", COPY))
    for name in "qkv":
        rules.append(TensorRule(layer + f"self_attn.{name}_proj.weight", p + f"layers/attn/{name}/kernel", LINEAR))
        rules.append(TensorRule(layer + f"self_attn.{name}_proj.bias", p + f"layers/attn/{name}/bias", BIAS))
    rules.append(TensorRule(layer + "self_attn.out_proj.weight", p + "layers/attn/out/kernel", LINEAR, num_in=2))
    rules.append(TensorRule(layer + "self_attn.out_proj.bias", p + "layers/attn/out/bias", BIAS))
    for fc in ("fc1", "fc2"):
        rules.append(TensorRule(layer + f"mlp.{fc}.weight", p + f"layers/mlp/{fc}/kernel", LINEAR))
        rules.append(TensorRule(layer + f"mlp.{fc}.bias", p + f"layers/mlp/{fc}/bias", BIAS))
    if post_layernorm:
        rules.append(TensorRule(h + "post_layernorm.weight", p + "post_layernorm/scale", COPY))
        rules.append(TensorRule(h + "post_layernorm.bias", p + "post_layernorm/bias", COPY))
    return rules


def siglip_ignored(cfg: SiglipConfig, hf_prefix: str = "vision_model.", total_layers: int | None = None) -> tuple[str, ...]:
    """fnmatch patterns of tower tensors that may be present and are dropped: the pooling head, the
    ``position_ids`` buffer, and encoder layers ``cfg.num_layers .. total_layers - 1`` (not run)."""
    dropped = range(cfg.num_layers, total_layers or cfg.num_layers)
    return (
        hf_prefix + "head.*",
        hf_prefix + "embeddings.position_ids",
        *(hf_prefix + f"encoder.layers.{i}.*" for i in dropped),
    )


def projector_rules(kind: str, prefix: str = "", hf_prefix: str = "model.") -> list[TensorRule]:
    """Rules for the original ``mm_projector`` names (``nn.Sequential`` indices 0 and 2, or a single Linear)."""
    h = hf_prefix + "mm_projector."
    if kind == "mlp2x_gelu":
        layers = (("0.", "fc1/"), ("2.", "fc2/"))
    elif kind == "linear":
        layers = (("", "fc1/"),)
    else:
        raise ConversionError(f"unknown projector kind {kind!r}; choose one of {', '.join(PROJECTOR_KINDS)}")
    rules = []
    for theirs, ours in layers:
        rules.append(TensorRule(h + theirs + "weight", prefix + ours + "kernel", LINEAR))
        rules.append(TensorRule(h + theirs + "bias", prefix + ours + "bias", BIAS))
    return rules


def siglip_config_from_weights(
    shapes: Mapping[str, tuple[int, ...]],
    hf_prefix: str,
    known: Mapping[str, Any],
    *,
    use_post_layernorm: bool = False,
    source: str = "weights",
) -> SiglipConfig:
    """The tower's config from tensor shapes (name -> shape) for checkpoints whose config.json does not
    describe it. Layers, hidden and MLP sizes, channels and patch size come from the weights; ``known``
    supplies ``num_heads`` and ``layer_norm_eps`` (e.g. :data:`SO400M_KNOWN`). The number of positions
    gives the patch grid g; the image size is ``known['image_size']`` if given (checked: its // patch must
    be g), else g * patch. Every layer present is run."""
    h = hf_prefix
    wanted = (h + _PATCH, h + _POSITIONS, h + "encoder.layers.0.mlp.fc1.weight")
    absent = [n for n in wanted if n not in shapes]
    if absent:
        raise ConversionError(f"{source}: no SigLIP vision tower under prefix {hf_prefix!r}; missing {', '.join(absent)}")
    lacking = [k for k in ("num_heads", "layer_norm_eps") if k not in known]
    if lacking:
        raise ConversionError(f"{source}: the weights do not reveal {', '.join(lacking)}; pass them in `known`")
    patch = tuple(shapes[h + _PATCH])
    if len(patch) != 4 or patch[2] != patch[3]:
        raise ConversionError(f"{source}: {h + _PATCH} has shape {patch}; expected (hidden, channels, p, p)")
    hidden, channels, p = patch[0], patch[1], patch[2]
    num_positions, pos_width = tuple(shapes[h + _POSITIONS])
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions or pos_width != hidden:
        raise ConversionError(
            f"{source}: {h + _POSITIONS} has shape {(num_positions, pos_width)}; expected (g*g, {hidden}) for a g x g "
            "patch grid"
        )
    # The positions fix only image_size // p (a "valid" convolution drops the remainder: so400m is
    # 384 = 27 * 14 + 6), so a known image_size wins when it agrees with the grid.
    image_size = grid * p
    if "image_size" in known:
        if int(known["image_size"]) // p != grid:
            raise ConversionError(
                f"{source}: the weights imply a {grid} x {grid} patch grid ({num_positions} positions, patch {p}), "
                f"but the known configuration's image_size {known['image_size']} gives "
                f"{int(known['image_size']) // p} patches per side"
            )
        image_size = int(known["image_size"])
    pattern = re.compile(re.escape(h) + r"encoder\.layers\.(\d+)\.")
    indices = sorted({int(m.group(1)) for name in shapes if (m := pattern.match(name))})
    if indices != list(range(len(indices))):
        raise ConversionError(f"{source}: encoder layers under {h!r} are not numbered 0..n-1: {indices}")
    return SiglipConfig(
        image_size=image_size,
        patch_size=p,
        hidden_size=hidden,
        intermediate_size=tuple(shapes[h + "encoder.layers.0.mlp.fc1.weight"])[0],
        num_layers=len(indices),
        num_heads=int(known["num_heads"]),
        layer_norm_eps=float(known["layer_norm_eps"]),
        num_channels=channels,
        use_post_layernorm=use_post_layernorm,
    )


def _find_hf_prefix(reader: SafetensorsReader, model_type: str, directory: str) -> str:
    candidates = ("vision_model.",) if model_type == "siglip" else ("vision_model.", "")
    for prefix in candidates:
        if prefix + _PATCH in reader:
            return prefix
    looked = " or ".join(repr(c + _PATCH) for c in candidates)
    raise ConversionError(f"{directory}: no SigLIP vision tensors found (looked for {looked})")


def load_siglip_values(
    directory: str, select_layer: int = -2, prefix: str = ""
) -> tuple[SiglipConfig, dict[str, Any]]:
    """Reads a Hugging Face SiglipVisionModel or SiglipModel directory (safetensors only) into our
    parameter layout: the tower's config and ``{prefix + path: array}``."""
    hf = read_config(directory)
    source = f"{directory}/config.json"
    cfg = siglip_config_from_hf(hf, select_layer=select_layer, source=source)
    total = int(vision_dict(hf, source)["num_hidden_layers"])
    reader = SafetensorsReader(directory)
    hf_prefix = _find_hf_prefix(reader, hf["model_type"], directory)
    ignored = siglip_ignored(cfg, hf_prefix, total)
    if hf["model_type"] == "siglip":
        ignored += SIGLIP_TEXT_IGNORED
    shapes = param_shapes(abstract_model(lambda rngs: SiglipVisionTower(cfg, Runtime(), rngs=rngs)))  # a runtime changes no shape
    values = import_tensors(
        reader, siglip_rules(cfg, prefix=prefix, hf_prefix=hf_prefix), {prefix + k: v for k, v in shapes.items()},
        ignore=ignored, desc="siglip",
    )
    return cfg, values


def load_siglip(directory: str, runtime: Runtime = Runtime(), select_layer: int = -2) -> SiglipVisionTower:
    """Builds a :class:`SiglipVisionTower` from a Hugging Face SiglipVisionModel or SiglipModel directory
    (safetensors only). ``select_layer`` as in the module doc; -2 gives the Wings features."""
    cfg, values = load_siglip_values(directory, select_layer=select_layer)
    return materialize(lambda rngs: SiglipVisionTower(cfg, runtime, rngs=rngs), values)
