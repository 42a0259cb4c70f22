"""The full released layout of Wings-Qwen1_5-8B through config inference and every name and shape check.

The expected layout comes from an independent source, not from our rules: transformers' Qwen2ForCausalLM and
SiglipVisionModel built on the meta device (names and shapes only, no values) from the published
Qwen1.5-7B-Chat and siglip-so400m-patch14-384 configurations, the tower's last encoder layer dropped and its
pooling head replaced by Identity (as the original SigLipVisionTower.load_model does), plus the learner, router
and projector modules the original code adds (spec section 7; original module names: ``attn_pool`` /
``attn_t_pool`` = WingsAttention with ``{q,k,v,o}_proj = Sequential(Linear(in, lora_dim), Linear(lora_dim, out))``,
``reweight_module = ReweightLinear(4096)`` holding ``linear = Linear(4096, 2)``, ``mm_projector`` =
``Sequential(Linear(1152, H), GELU, Linear(H, H))``).
"""
import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel

from wings_jax.convert.hf_io import ConversionError
from wings_jax.convert.mapping import check_tensors
from wings_jax.convert.wings_params import VISION_PREFIX, released_rules, wings_config_from_released

# config.json of Qwen/Qwen1.5-7B-Chat as published
QWEN15_7B_CHAT = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643, "eos_token_id": 151645,
    "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 11008,
    "max_position_embeddings": 32768, "max_window_layers": 28, "model_type": "qwen2", "num_attention_heads": 32,
    "num_hidden_layers": 32, "num_key_value_heads": 32, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.37.0", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}
# config.json of google/siglip-so400m-patch14-384 as published (a full SiglipModel; the tower is its vision part)
SO400M = {
    "architectures": ["SiglipModel"], "initializer_factor": 1.0, "model_type": "siglip",
    "text_config": {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
                    "num_attention_heads": 16, "num_hidden_layers": 27},
    "torch_dtype": "float32", "transformers_version": "4.37.0.dev0",
    "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                      "model_type": "siglip_vision_model", "num_attention_heads": 16, "num_hidden_layers": 27,
                      "patch_size": 14},
}
# what the Wings training script (run/finetune_wings_qwen1_5.sh) adds to the LLM's config.json
LORA_DIM, ROUTER_LEN = 64, 4096
WINGS_FIELDS = {
    "architectures": ["WingsQwen2ForCausalLM"], "model_type": "wings_qwen2", "lora_dim": LORA_DIM,
    "attn_layers_idx": list(range(32)), "wings_router_type": "linear", "mm_projector_type": "mlp2x_gelu",
    "mm_vision_tower": "google/siglip-so400m-patch14-384", "mm_hidden_size": 1152, "mm_vision_select_layer": -2,
    "image_token_length": 729, "system_prompt_length": 14, "image_aspect_ratio": "pad", "model_max_length": 2048,
}


class LayoutReader:
    """A checkpoint's names and shapes without values: reading one fails the test."""

    directory = "Wings-Qwen1_5-8B"

    def __init__(self, shapes: dict[str, tuple[int, ...]]):
        self.shapes = shapes

    def keys(self):
        return list(self.shapes)

    def __contains__(self, key):
        return key in self.shapes

    def shape(self, key):
        return self.shapes[key]

    def dtype(self, key):
        return "BF16"

    def __getitem__(self, key):
        raise AssertionError(f"a value was read: {key}")


def _meta_shapes(model: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def released_layout() -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        llm = Qwen2ForCausalLM(Qwen2Config(**QWEN15_7B_CHAT))
        tower = SiglipVisionModel(SiglipVisionConfig(**SO400M["vision_config"]))
    layout = _meta_shapes(llm)
    dropped = f"encoder.layers.{SO400M['vision_config']['num_hidden_layers'] - 1}."
    for name, shape in _meta_shapes(tower).items():
        name = name.removeprefix("vision_model.")  # transformers 4 nests the tower, 5 does not
        if not (name.startswith(dropped) or name.startswith("head.")):
            layout[VISION_PREFIX + name] = shape
    hidden, heads = QWEN15_7B_CHAT["hidden_size"], QWEN15_7B_CHAT["num_attention_heads"]
    head_dim = hidden // heads
    kv = QWEN15_7B_CHAT["num_key_value_heads"] * head_dim
    ins_outs = {"q": (hidden, heads * head_dim), "k": (hidden, kv), "v": (hidden, kv), "o": (heads * head_dim, hidden)}
    for i in WINGS_FIELDS["attn_layers_idx"]:
        for pool in ("attn_pool", "attn_t_pool"):
            for proj, (n_in, n_out) in ins_outs.items():
                layout[f"model.layers.{i}.{pool}.{proj}_proj.0.weight"] = (LORA_DIM, n_in)
                layout[f"model.layers.{i}.{pool}.{proj}_proj.1.weight"] = (n_out, LORA_DIM)
        layout[f"model.layers.{i}.reweight_module.linear.weight"] = (2, ROUTER_LEN)
        layout[f"model.layers.{i}.reweight_module.linear.bias"] = (2,)
    vision_hidden = SO400M["vision_config"]["hidden_size"]
    layout.update({"model.mm_projector.0.weight": (hidden, vision_hidden), "model.mm_projector.0.bias": (hidden,),
                   "model.mm_projector.2.weight": (hidden, hidden), "model.mm_projector.2.bias": (hidden,)})
    return layout


@pytest.fixture(scope="module")
def layout():
    return released_layout()


def _check(layout):
    reader = LayoutReader(layout)
    cfg, has_router, has_post_ln = wings_config_from_released({**QWEN15_7B_CHAT, **WINGS_FIELDS}, reader,
                                                               "Wings-Qwen1_5-8B/config.json", "reference")
    rules, shapes, ignored = released_rules(cfg, has_router, has_post_ln)
    check_tensors(reader, rules, shapes, ignore=ignored)
    return cfg, has_router, has_post_ln


def test_the_released_wings_qwen1_5_8b_layout_maps_completely(layout):
    assert len(layout) == 32 * (12 + 2 * 8 + 2) + 3 + 26 * 16 + 5 + 4  # LLM + learners/routers, tower, projector
    cfg, has_router, has_post_ln = _check(layout)
    assert (cfg.llm.num_layers, cfg.llm.hidden_size, cfg.llm.vocab_size, cfg.llm.num_kv_heads) == (32, 4096, 151936, 32)
    assert cfg.llm.rope_theta == 1e6 and not cfg.llm.tie_word_embeddings
    v = cfg.vision
    assert (v.num_layers, v.hidden_size, v.intermediate_size, v.num_heads, v.image_size, v.patch_size) == (
        26, 1152, 4304, 16, 384, 14)
    assert cfg.tokens_per_image == 729 and has_router and has_post_ln
    assert (cfg.wings.stage, cfg.wings.lora_rank, cfg.wings.router_max_len, cfg.wings.learner_layers) == (
        "finetune", 64, 4096, None)


def test_the_layout_checks_catch_a_missing_and_a_misshaped_tensor(layout):
    broken = dict(layout)
    del broken[VISION_PREFIX + "encoder.layers.25.mlp.fc2.bias"]
    broken["model.layers.31.attn_t_pool.o_proj.1.weight"] = (4096, 32)
    with pytest.raises(ConversionError) as e:
        _check(broken)
    message = str(e.value)
    assert "missing tensors (1): " + VISION_PREFIX + "encoder.layers.25.mlp.fc2.bias" in message
    assert "model.layers.31.attn_t_pool.o_proj.1.weight: shape (4096, 32) cannot become" in message
