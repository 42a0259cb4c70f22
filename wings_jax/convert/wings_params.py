"""Wings checkpoints: building from Hugging Face base models, and the released original layout.

The released layout (spec section 7) is a ``WingsQwen2ForCausalLM`` state dict: Qwen2 names, the
learners as ``attn_pool`` (visual) / ``attn_t_pool`` (textual) with ``{q,k,v,o}_proj.{0,1}`` =
(A^T, B^T), the router as ``reweight_module.linear``, the projector as ``mm_projector`` and the
SigLIP tower (last encoder layer already removed) under ``model.vision_tower.vision_tower``.
"""
from __future__ import annotations

import collections
import json
import os
from typing import Any, Mapping

import numpy as np
from flax import nnx

from wings_jax.convert.hf_io import ConversionError, SafetensorsReader, read_config, write_safetensors
from wings_jax.convert.mapping import BIAS, LINEAR, TensorRule, export_tensors, import_tensors
from wings_jax.convert.qwen_params import (
    QWEN_IGNORED, load_qwen_values, qwen_config_from_hf, qwen_config_to_hf, qwen_rules,
)
from wings_jax.convert.siglip_params import (
    KNOWN_TOWERS, load_siglip_values, projector_rules, siglip_config_from_weights,
    siglip_config_to_hf, siglip_ignored, siglip_rules, vision_dict,
)
from wings_jax.model.learners import WingsConfig
from wings_jax.model.runtime import DTYPES, Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import (
    LEARNERS, LLM, PROJECTOR, ROUTER, VISION, abstract_model, flat_values, materialize, param_shapes,
)

VISION_PREFIX = "model.vision_tower.vision_tower.vision_model."
DEFAULT_VISION_TOWER = "google/siglip-so400m-patch14-384"
LEARNER_NAMES = (("attn_pool", "visual"), ("attn_t_pool", "textual"))  # (released, ours)
TORCH_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16"}


def learner_rules(cfg: WingsModelConfig, include_router: bool) -> list[TensorRule]:
    layers = tuple(i for i, on in enumerate(cfg.wings.layer_flags(cfg.llm.num_layers)) if on)
    rules = []
    for theirs, ours in LEARNER_NAMES:
        for proj in "qkvo":
            # nn.Sequential(Linear(H, r), Linear(r, H)): weights A^T (r x H) and B^T (H x r)
            for index, matrix in (("0", "a"), ("1", "b")):
                rules.append(TensorRule(
                    f"model.layers.{{i}}.{theirs}.{proj}_proj.{index}.weight", f"{LEARNERS}{ours}/{proj}_{matrix}",
                    LINEAR, layers=layers,
                ))
    if include_router:
        rules.append(TensorRule("model.layers.{i}.reweight_module.linear.weight", ROUTER + "weight",
                                LINEAR, layers=layers))
        rules.append(TensorRule("model.layers.{i}.reweight_module.linear.bias", ROUTER + "bias",
                                BIAS, layers=layers))
    return rules


def wings_rules(cfg: WingsModelConfig, include_router: bool, post_layernorm: bool = True) -> list[TensorRule]:
    return (
        qwen_rules(cfg.llm, LLM)
        + learner_rules(cfg, include_router)
        + projector_rules(cfg.projector, PROJECTOR, "model.")
        + siglip_rules(cfg.vision, VISION, VISION_PREFIX, post_layernorm=post_layernorm)
    )


def _dominant_dtype(reader: SafetensorsReader) -> str:
    counts = collections.Counter(reader.dtype(k) for k in reader.keys())
    name = counts.most_common(1)[0][0]
    return TORCH_DTYPES.get(name, "float32")


# What the weights cannot tell about the tower: (our name, the SiglipVisionConfig field)
TOWER_FIELDS = (("num_heads", "num_attention_heads"), ("layer_norm_eps", "layer_norm_eps"),
                ("image_size", "image_size"))


def _local_tower(name: str) -> dict[str, Any]:
    """The tower fields of a local SigLIP directory's config.json; empty when ``name`` is no such directory."""
    if not os.path.isfile(os.path.join(name, "config.json")):
        return {}
    described = vision_dict(read_config(name), f"{name}/config.json")
    return {ours: described[theirs] for ours, theirs in TOWER_FIELDS}


def _known_tower(hf: Mapping[str, Any], overrides: Mapping[str, Any] | None, source: str) -> dict[str, Any]:
    """The tower's heads, LayerNorm eps and image size; each from the first of: ``overrides`` (flags), a
    ``vision_config`` in config.json (our own exports write one), the config.json of a local directory named
    by ``mm_vision_tower``, the known configuration of the hub tower it names."""
    name = str(hf.get("mm_vision_tower", DEFAULT_VISION_TOWER)).rstrip("/")
    table: dict[str, Any] = {}
    for hub_id, values in KNOWN_TOWERS.items():
        if name == hub_id or name.endswith("/" + hub_id.split("/")[-1]) or name == hub_id.split("/")[-1]:
            table.update(values)
    described = hf.get("vision_config") or {}
    levels = (table, _local_tower(name), {ours: described.get(theirs) for ours, theirs in TOWER_FIELDS},
              overrides or {})
    known: dict[str, Any] = {}
    for level in levels:  # lowest precedence first
        known.update({k: v for k, v in level.items() if v is not None})
    if "num_heads" not in known or "layer_norm_eps" not in known:
        raise ConversionError(
            f"{source}: the vision tower {name!r} is neither a local SigLIP directory nor one whose configuration "
            f"is known ({', '.join(KNOWN_TOWERS)}); give its number of heads, LayerNorm eps and image size "
            "(--vision-heads, --vision-eps, --vision-image-size)"
        )
    return known


def wings_config_from_released(hf: Mapping[str, Any], reader: SafetensorsReader, source: str, mixing: str,
                               vision_known: Mapping[str, Any] | None = None) -> tuple[WingsModelConfig, bool, bool]:
    """Model config of a released checkpoint; also whether it holds routers and a post-layernorm."""
    llm = qwen_config_from_hf(hf, source=source, model_types=("wings_qwen2",))
    router_type = hf.get("wings_router_type", "linear")
    if router_type not in ("linear", "pretrain"):
        raise ConversionError(f"{source}: wings_router_type {router_type!r} is not supported (linear or pretrain)")
    learner_layers = hf.get("attn_layers_idx")
    if learner_layers is not None:
        learner_layers = tuple(sorted(int(i) for i in learner_layers))
        if learner_layers == tuple(range(llm.num_layers)):
            learner_layers = None
    has_router = any(".reweight_module." in k for k in reader.keys())
    if router_type == "linear" and not has_router:
        raise ConversionError(f"{source}: wings_router_type is 'linear' but the weights hold no reweight_module")
    router_len = 4096
    if has_router:
        first = next(k for k in reader.keys() if k.endswith("reweight_module.linear.weight"))
        router_len = reader.shape(first)[1]
    known = _known_tower(hf, vision_known, source)
    shapes = {k: reader.shape(k) for k in reader.keys() if k.startswith(VISION_PREFIX)}
    vision = siglip_config_from_weights(shapes, VISION_PREFIX, known, source=source)
    cfg = WingsModelConfig(
        llm=llm,
        vision=vision,
        wings=WingsConfig(
            stage="finetune" if router_type == "linear" else "pretrain",
            learner_layers=learner_layers,
            lora_rank=int(hf.get("lora_dim", 64)),
            router_max_len=router_len,
            mixing=mixing,
            system_prompt_length=int(hf.get("system_prompt_length", 14)),
        ),
        projector=hf.get("mm_projector_type", "mlp2x_gelu"),
    )
    expected_tokens = hf.get("image_token_length")
    if expected_tokens is not None and int(expected_tokens) != cfg.tokens_per_image:
        raise ConversionError(
            f"{source}: image_token_length {expected_tokens} disagrees with the tower's "
            f"{cfg.tokens_per_image} patches ({vision.image_size}px, patch {vision.patch_size})"
        )
    return cfg, has_router, VISION_PREFIX + "post_layernorm.weight" in reader


def released_rules(cfg: WingsModelConfig, has_router: bool,
                   has_post_layernorm: bool) -> tuple[list[TensorRule], dict[str, tuple[int, ...]], tuple[str, ...]]:
    """The rules, our parameter shapes and the ignored HF names of a released checkpoint of ``cfg``
    (builds no array)."""
    # a runtime changes no shape
    shapes = param_shapes(abstract_model(lambda rngs: WingsModel(cfg, Runtime(), rngs=rngs)))
    rules = wings_rules(cfg, has_router, post_layernorm=has_post_layernorm)
    return rules, shapes, QWEN_IGNORED + siglip_ignored(cfg.vision, VISION_PREFIX)


def import_wings(src: str, runtime: Runtime = Runtime(), mixing: str = "reference",
                 vision_known: Mapping[str, Any] | None = None) -> tuple[WingsModel, dict]:
    """Loads a released original Wings checkpoint directory; returns the model and metadata.

    ``vision_known`` may give the tower's ``num_heads``, ``layer_norm_eps`` and ``image_size``.
    """
    hf = read_config(src)
    reader = SafetensorsReader(src)
    cfg, has_router, has_post_ln = wings_config_from_released(hf, reader, f"{src}/config.json", mixing,
                                                              vision_known)
    rules, shapes, ignored = released_rules(cfg, has_router, has_post_ln)
    values = import_tensors(reader, rules, shapes, ignore=ignored, desc="wings")
    metadata = {"source": "released-wings", "source_dir": src, "source_dtype": _dominant_dtype(reader),
                "has_router": has_router, "has_post_layernorm": has_post_ln,
                "mm_vision_tower": hf.get("mm_vision_tower", DEFAULT_VISION_TOWER)}
    return materialize(lambda rngs: WingsModel(cfg, runtime, rngs=rngs), values), metadata


def build_from_hf(llm_dir: str, vision_dir: str | None, wings: WingsConfig, runtime: Runtime = Runtime(),
                  projector: str = "mlp2x_gelu", select_layer: int = -2, seed: int = 0) -> tuple[WingsModel, dict]:
    """A fresh Wings model: Qwen2 (and SigLIP) weights from HF directories, learners/projector initialised."""
    llm_cfg, values = load_qwen_values(llm_dir, prefix=LLM)
    vision_cfg = None
    if vision_dir is not None:
        vision_cfg, vision_values = load_siglip_values(vision_dir, select_layer=select_layer, prefix=VISION)
        values.update(vision_values)
    cfg = WingsModelConfig(llm=llm_cfg, vision=vision_cfg, wings=wings, projector=projector)

    def make(rngs):
        return WingsModel(cfg, runtime, rngs=rngs)

    metadata = {"source": "hf", "llm_dir": llm_dir, "vision_dir": vision_dir,
                "source_dtype": _dominant_dtype(SafetensorsReader(llm_dir)), "has_router": True,
                "has_post_layernorm": True}
    return materialize(make, values, seed=seed), metadata


def _host_params(model: WingsModel) -> dict[str, np.ndarray]:
    return {k: np.asarray(v) for k, v in flat_values(nnx.state(model, nnx.Param)).items()}


def export_wings(model: WingsModel, out: str, dtype: str, metadata: Mapping[str, Any] | None = None) -> list[str]:
    """Writes the released layout (config.json + safetensors) for ``model``."""
    cfg = model.cfg
    if not cfg.wings.enabled:
        raise ConversionError("export-wings needs the Wings branch; this model has none (wings.enabled=False): "
                              "export its language model with export-hf-llm")
    if cfg.vision is None:
        raise ConversionError("export-wings needs a model with a vision tower (the released layout has one)")
    metadata = dict(metadata or {})
    flags = cfg.wings.layer_flags(cfg.llm.num_layers)
    hf = qwen_config_to_hf(cfg.llm, dtype)
    hf.update({
        "architectures": ["WingsQwen2ForCausalLM"],
        "model_type": "wings_qwen2",
        "lora_dim": cfg.wings.lora_rank,
        "attn_layers_idx": [i for i, on in enumerate(flags) if on],
        "wings_router_type": "linear" if cfg.wings.stage == "finetune" else "pretrain",
        "system_prompt_length": cfg.wings.system_prompt_length,
        "mm_projector_type": cfg.projector,
        "mm_vision_tower": metadata.get("mm_vision_tower", DEFAULT_VISION_TOWER),
        "mm_hidden_size": cfg.vision.hidden_size,
        "mm_vision_select_layer": -2,
        "image_token_length": cfg.tokens_per_image,
        "image_aspect_ratio": "pad",
        "vision_config": siglip_config_to_hf(cfg.vision, dtype),
    })
    rules = wings_rules(cfg, include_router=cfg.wings.stage == "finetune",
                        post_layernorm=metadata.get("has_post_layernorm", True))
    tensors = export_tensors(_host_params(model), rules, dtype=np.dtype(DTYPES[dtype]))
    names = write_safetensors(out, tensors)
    _write_json(out, hf)
    return names


def export_hf_llm(model: WingsModel, out: str, dtype: str) -> list[str]:
    """Writes the language model alone as a standard transformers Qwen2 directory."""
    tensors = export_tensors(_host_params(model), qwen_rules(model.cfg.llm, LLM), dtype=np.dtype(DTYPES[dtype]))
    names = write_safetensors(out, tensors)
    _write_json(out, qwen_config_to_hf(model.cfg.llm, dtype))
    return names


def _write_json(directory: str, body: Mapping[str, Any]) -> None:
    with open(os.path.join(directory, "config.json"), "w", encoding="utf-8") as f:
        json.dump(body, f, indent=2)
