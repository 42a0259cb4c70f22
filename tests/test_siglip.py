"""SigLIP vision tower, projector and their converters against tiny random transformers models (CPU, no downloads)."""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file

from wings_jax.convert.hf_io import ConversionError, SafetensorsReader
from wings_jax.convert.mapping import export_tensors, import_tensors
from wings_jax.convert.siglip_params import (
    SO400M_KNOWN,
    load_siglip,
    projector_rules,
    siglip_config_from_hf,
    siglip_config_from_weights,
    siglip_config_to_hf,
    siglip_ignored,
    siglip_rules,
)
from wings_jax.model.projector import Projector
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig, SiglipVisionTower
from wings_jax.params import abstract_model, flat_values, flat_variables, materialize, param_shapes
from wings_jax.sharding import DEFAULT_RULES

transformers = pytest.importorskip("transformers")

# (a) image 28 / patch 14 = 2x2 tokens, 4 heads; (b) image 32 / patch 8 = 4x4 tokens, 3 heads, other MLP;
# (c) image 30 / patch 8: not a multiple, like so400m's 384 / 14; the last 6 pixel rows and columns are unused.
SHAPES = {
    "a": dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4, image_size=28, patch_size=14),
    "b": dict(hidden_size=48, intermediate_size=80, num_hidden_layers=4, num_attention_heads=3, image_size=32, patch_size=8),
    "c": dict(hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=2, image_size=30, patch_size=8),
}
TOL = 1e-4


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """HF init leaves LayerNorms at (1, 0) and biases at 0; randomise everything so each tensor matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def _save(model, path) -> str:
    model.save_pretrained(str(path), safe_serialization=True)
    return str(path)


@pytest.fixture(scope="module")
def vision_dirs(tmp_path_factory):
    """name -> (directory, torch SiglipVisionModel) for each shape in SHAPES."""
    out = {}
    for i, (name, kw) in enumerate(SHAPES.items()):
        torch.manual_seed(i)
        model = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(**kw)).eval()
        _perturb(model, 100 + i)
        out[name] = (_save(model, tmp_path_factory.mktemp(f"siglip_{name}")), model)
    return out


@pytest.fixture(scope="module")
def full_dir(tmp_path_factory):
    torch.manual_seed(7)
    cfg = transformers.SiglipConfig(
        text_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                         vocab_size=64, max_position_embeddings=16, bos_token_id=1, eos_token_id=2, pad_token_id=0),
        vision_config=SHAPES["a"],
    )
    model = transformers.SiglipModel(cfg).eval()
    _perturb(model, 7)
    return _save(model, tmp_path_factory.mktemp("siglip_full")), model


def _pixels(size: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _nhwc(x: torch.Tensor) -> np.ndarray:
    return x.permute(0, 2, 3, 1).numpy()


def _torch_out(model, pixels):
    with torch.no_grad():
        return model(pixel_values=pixels, output_hidden_states=True)


# ---------------------------------------------------------------------------------------------
# Forward parity


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_features_equal_hidden_states_minus_2(vision_dirs, name):
    directory, model = vision_dirs[name]
    kw = SHAPES[name]
    pixels = _pixels(kw["image_size"])
    tower = load_siglip(directory)  # select_layer=-2: the Wings features
    assert tower.cfg.num_layers == kw["num_hidden_layers"] - 1 and not tower.cfg.use_post_layernorm
    ours = np.asarray(tower(_nhwc(pixels)))
    ref = _torch_out(model, pixels).hidden_states[-2].numpy()
    assert ours.shape == (2, (kw["image_size"] // kw["patch_size"]) ** 2, kw["hidden_size"])
    np.testing.assert_allclose(ours, ref, atol=TOL, rtol=0)


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_select_layer_minus_1_is_last_hidden_state(vision_dirs, name):
    directory, model = vision_dirs[name]
    pixels = _pixels(SHAPES[name]["image_size"], seed=1)
    tower = load_siglip(directory, select_layer=-1)
    assert tower.cfg.use_post_layernorm and tower.cfg.num_layers == SHAPES[name]["num_hidden_layers"]
    ref = _torch_out(model, pixels).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(tower(_nhwc(pixels))), ref, atol=TOL, rtol=0)


def test_general_select_layer(vision_dirs):
    directory, model = vision_dirs["b"]
    pixels = _pixels(32, seed=2)
    tower = load_siglip(directory, select_layer=-3)
    assert tower.cfg.num_layers == 2
    ref = _torch_out(model, pixels).hidden_states[-3].numpy()
    np.testing.assert_allclose(np.asarray(tower(_nhwc(pixels))), ref, atol=TOL, rtol=0)


def test_full_siglip_model_directory(full_dir):
    directory, model = full_dir
    pixels = _pixels(28, seed=3)
    tower = load_siglip(directory)  # text tower, logit scale/bias, pooling head and dropped layer are ignored
    with torch.no_grad():
        ref = model.vision_model(pixel_values=pixels, output_hidden_states=True).hidden_states[-2].numpy()
    np.testing.assert_allclose(np.asarray(tower(_nhwc(pixels))), ref, atol=TOL, rtol=0)


def test_scan_and_unrolled_and_remat_agree(vision_dirs):
    directory, _ = vision_dirs["b"]
    pixels = _nhwc(_pixels(32, seed=4))
    scanned = np.asarray(load_siglip(directory)(pixels))
    unrolled = np.asarray(load_siglip(directory, Runtime(scan_layers=False, remat="full"))(pixels))
    np.testing.assert_allclose(unrolled, scanned, atol=1e-5, rtol=0)  # same math, different fusion


# bfloat16 has an 8-bit mantissa: one ulp at the largest features (~10) is 0.06. Measured max error ~0.11
# (about 1% of max |ref|) for shapes a and b; the bound is 2% of max |ref|.
BF16_TOL = 0.02


def test_bfloat16_compute_within_tolerance(vision_dirs):
    directory, model = vision_dirs["b"]
    pixels = _pixels(32, seed=5)
    tower = load_siglip(directory, Runtime(dtype="bfloat16"))
    ours = tower(_nhwc(pixels))
    assert ours.dtype == jnp.bfloat16
    ref = _torch_out(model, pixels).hidden_states[-2].numpy()
    err = np.abs(np.asarray(ours, np.float32) - ref).max()
    assert err < BF16_TOL * np.abs(ref).max(), (err, np.abs(ref).max())


def test_frozen_features_pass_no_gradient(vision_dirs):
    tower = load_siglip(vision_dirs["a"][0])
    pixels = jnp.asarray(_nhwc(_pixels(28)))
    graphdef, params = nnx.split(tower, nnx.Param)

    def loss(p, frozen):
        t = nnx.merge(graphdef, p)
        return jnp.sum((t.frozen_features(pixels) if frozen else t(pixels)) ** 2)

    grad = jax.jit(jax.grad(loss), static_argnums=1)
    assert all(not np.any(np.asarray(g)) for g in jax.tree.leaves(grad(params, True)))
    assert any(np.any(np.asarray(g)) for g in jax.tree.leaves(grad(params, False)))


# ---------------------------------------------------------------------------------------------
# Refusals


def test_image_size_smaller_than_patch_refused():
    with pytest.raises(ValueError, match=r"image_size=10 is smaller than patch_size=14"):
        SiglipConfig(image_size=10, patch_size=14, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)
    hf = dict(model_type="siglip_vision_model", **{**SHAPES["a"], "image_size": 10})
    with pytest.raises(ValueError, match=r"my/config.json: image_size=10 is smaller than patch_size=14"):
        siglip_config_from_hf(hf, source="my/config.json")
    # Not a multiple is fine (HF semantics): so400m's 384 / 14 gives a 27 x 27 grid.
    cfg = SiglipConfig(image_size=384, patch_size=14, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4)
    assert (cfg.grid, cfg.num_positions) == (27, 729)


def test_wrong_pixel_shape_refused():
    cfg = SiglipConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=48, num_layers=1, num_heads=4)
    tower = abstract_model(lambda r: SiglipVisionTower(cfg, Runtime(), rngs=r))  # refused before any weight is used
    with pytest.raises(ValueError, match=r"expects pixels of shape \(\.\.\., 28, 28, 3\).*got \(1, 3, 28, 28\)"):
        tower(jnp.zeros((1, 3, 28, 28)))


def test_config_errors():
    base = dict(model_type="siglip_vision_model", **SHAPES["a"])
    with pytest.raises(ConversionError, match=r"d/config.json: model_type 'clip_vision_model' is not a SigLIP vision tower"):
        siglip_config_from_hf({**base, "model_type": "clip_vision_model"}, source="d/config.json")
    with pytest.raises(ConversionError, match=r"d/config.json: hidden_act 'gelu' is not supported.*gelu_pytorch_tanh"):
        siglip_config_from_hf({**base, "hidden_act": "gelu"}, source="d/config.json")
    with pytest.raises(ConversionError, match=r"d/config.json \(vision_config\): hidden_act 'quick_gelu'"):
        siglip_config_from_hf({"model_type": "siglip", "vision_config": {**base, "hidden_act": "quick_gelu"}},
                              source="d/config.json")
    with pytest.raises(ConversionError, match=r"select_layer=-4 is out of range for 3 encoder layers"):
        siglip_config_from_hf(base, select_layer=-4)
    with pytest.raises(ConversionError, match=r"select_layer=0 is out of range"):
        siglip_config_from_hf(base, select_layer=0)


def test_config_defaults_of_transformers4_style_config():
    # transformers 4 writes only the fields that differ from SiglipVisionConfig's defaults (so400m style).
    hf = {"model_type": "siglip", "text_config": {},
          "vision_config": {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304,
                            "model_type": "siglip_vision_model", "num_attention_heads": 16,
                            "num_hidden_layers": 27, "patch_size": [14, 14]}}
    cfg = siglip_config_from_hf(hf)
    assert cfg == SiglipConfig(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304,
                               num_layers=26, num_heads=16, layer_norm_eps=1e-6, num_channels=3)
    assert cfg.num_positions == 729


def _rewrite(src: str, dst, edit) -> str:
    """Copies an HF directory, editing its tensors dict with ``edit``."""
    dst = str(dst)
    shutil.copytree(src, dst)
    tensors = load_file(os.path.join(dst, "model.safetensors"))
    edit(tensors)
    save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    return dst


def test_converter_errors(vision_dirs, tmp_path):
    src = vision_dirs["a"][0]  # transformers 5 saves SiglipVisionModel without a 'vision_model.' prefix
    missing = _rewrite(src, tmp_path / "missing", lambda t: t.pop("encoder.layers.1.mlp.fc1.bias"))
    with pytest.raises(ConversionError, match=r"missing tensors \(1\): encoder\.layers\.1\.mlp\.fc1\.bias"):
        load_siglip(missing)

    def bad(t):
        t["embeddings.position_embedding.weight"] = np.zeros((5, 32), np.float32)
    wrong = _rewrite(src, tmp_path / "wrong", bad)
    with pytest.raises(ConversionError, match=r"wrong shape \(1\): embeddings\.position_embedding\.weight: shape \(5, 32\)"):
        load_siglip(wrong)

    def extra(t):
        t["encoder.extra_gate"] = np.zeros((2,), np.float32)
    unexpected = _rewrite(src, tmp_path / "unexpected", extra)
    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): encoder\.extra_gate"):
        load_siglip(unexpected)

    other = tmp_path / "other"
    shutil.copytree(src, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "clip_vision_model"}))
    with pytest.raises(ConversionError, match=rf"{other}/config.json: model_type 'clip_vision_model'"):
        load_siglip(str(other))

    no_vision = _rewrite(src, tmp_path / "no_vision", lambda t: t.pop("embeddings.patch_embedding.weight"))
    with pytest.raises(ConversionError, match=r"no SigLIP vision tensors found"):
        load_siglip(no_vision)


# ---------------------------------------------------------------------------------------------
# Export, config from weights, logical axes


def test_export_round_trip(vision_dirs, tmp_path):
    directory, model = vision_dirs["b"]
    tower = load_siglip(directory)  # 3 of 4 layers kept
    cfg = tower.cfg
    params = flat_values(nnx.state(tower, nnx.Param))
    exported = dict(export_tensors(params, siglip_rules(cfg, hf_prefix="")))
    original = load_file(os.path.join(directory, "model.safetensors"))
    dropped = set(siglip_ignored(cfg, "", 4))
    kept = {k for k in original if not any(fnmatch.fnmatchcase(k, p) for p in dropped)}
    assert set(exported) == kept
    for k in kept:
        np.testing.assert_array_equal(exported[k], original[k], err_msg=k)

    # The exported directory is a working transformers model whose last hidden state (before post-LN) is ours.
    out = tmp_path / "exported"
    out.mkdir()
    save_file(exported, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text(json.dumps(siglip_config_to_hf(cfg)))
    reloaded = transformers.SiglipVisionModel.from_pretrained(str(out)).eval()
    pixels = _pixels(32, seed=6)
    ref = _torch_out(reloaded, pixels).hidden_states[-1].numpy()
    np.testing.assert_allclose(np.asarray(tower(_nhwc(pixels))), ref, atol=TOL, rtol=0)
    assert siglip_config_from_hf(siglip_config_to_hf(cfg), select_layer=-1) == dataclasses.replace(
        cfg, use_post_layernorm=True)


def test_config_from_weights(vision_dirs):
    directory, _ = vision_dirs["b"]
    reader = SafetensorsReader(directory)
    shapes = {k: reader.shape(k) for k in reader.keys()}
    known = {"num_heads": 3, "layer_norm_eps": 1e-6, "image_size": 32}
    cfg = siglip_config_from_weights(shapes, "", known)
    with open(os.path.join(directory, "config.json")) as f:
        from_config = siglip_config_from_hf(json.load(f), select_layer=-1)
    assert cfg == dataclasses.replace(from_config, use_post_layernorm=False)
    # A checkpoint that already dropped its last layer (the released Wings layout) runs what it holds.
    shapes_wings = {"model.vision_tower.vision_tower.vision_model." + k: v for k, v in shapes.items()
                    if not k.startswith("encoder.layers.3.")}
    cfg = siglip_config_from_weights(shapes_wings, "model.vision_tower.vision_tower.vision_model.", known)
    assert cfg.num_layers == 3
    with pytest.raises(ConversionError, match=r"imply a 4 x 4 patch grid .* image_size 384 gives 48 patches per side"):
        siglip_config_from_weights(shapes, "", {**known, "image_size": 384})
    # The positions fix only image_size // patch; a known size with the same grid wins.
    assert siglip_config_from_weights(shapes, "", {**known, "image_size": 35}).image_size == 35
    assert siglip_config_from_weights(shapes, "", {"num_heads": 3, "layer_norm_eps": 1e-6}).image_size == 32
    with pytest.raises(ConversionError, match=r"do not reveal num_heads"):
        siglip_config_from_weights(shapes, "", {"layer_norm_eps": 1e-6})
    with pytest.raises(ConversionError, match=r"no SigLIP vision tower under prefix 'vision_model\.'"):
        siglip_config_from_weights(shapes, "vision_model.", known)


def test_config_from_weights_so400m_shapes():
    h = "model.vision_tower.vision_tower.vision_model."
    shapes = {h + "embeddings.patch_embedding.weight": (1152, 3, 14, 14),
              h + "embeddings.position_embedding.weight": (729, 1152)}
    for i in range(26):
        shapes[h + f"encoder.layers.{i}.mlp.fc1.weight"] = (4304, 1152)
    cfg = siglip_config_from_weights(shapes, h, SO400M_KNOWN)
    assert (cfg.image_size, cfg.patch_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_layers, cfg.num_heads) \
        == (384, 14, 1152, 4304, 26, 16)
    assert not cfg.use_post_layernorm and cfg.num_positions == 729


def _check_axes(module: nnx.Module, stacked_prefix: str | None = None) -> None:
    names = dict(DEFAULT_RULES)
    for path, var in flat_variables(nnx.state(module, nnx.Param)).items():
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None, path
        assert len(axes) == np.ndim(var.get_value()), (path, axes)
        assert all(a in names for a in axes), (path, axes)
        if stacked_prefix is not None and path.startswith(stacked_prefix):
            assert axes[0] == "layers", (path, axes)


def test_logical_axes():
    cfg = SiglipConfig(image_size=28, patch_size=14, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4)
    tower = abstract_model(lambda r: SiglipVisionTower(cfg, Runtime(), rngs=r))
    _check_axes(tower, stacked_prefix="layers/")
    shapes = param_shapes(tower)
    assert shapes["patch_embed/kernel"] == (14, 14, 3, 32)  # (kh, kw, in, out)
    assert shapes["position_embedding"] == (4, 32)
    assert shapes["layers/attn/q/kernel"] == (2, 32, 4, 8)
    axes = {p: v.get_metadata()["logical_axes"] for p, v in flat_variables(nnx.state(tower, nnx.Param)).items()}
    assert axes["patch_embed/kernel"] == ("vision_patch", "vision_patch", "vision_patch", "vision_embed")
    assert axes["position_embedding"] == ("vision_positions", "vision_embed")
    assert axes["layers/attn/out/kernel"] == ("layers", "vision_heads", "head_dim", "vision_embed")
    assert axes["layers/mlp/fc1/kernel"] == ("layers", "vision_embed", "vision_mlp")
    for kind in ("mlp2x_gelu", "linear"):
        _check_axes(abstract_model(lambda r: Projector(kind, 32, 24, Runtime(), rngs=r)))
    proj = abstract_model(lambda r: Projector("mlp2x_gelu", 32, 24, Runtime(), rngs=r))
    assert proj.fc1.kernel.get_metadata()["logical_axes"] == ("vision_embed", "mlp")
    assert proj.fc2.kernel.get_metadata()["logical_axes"] == ("mlp", "embed")
    lin = abstract_model(lambda r: Projector("linear", 32, 24, Runtime(), rngs=r))
    assert lin.fc1.kernel.get_metadata()["logical_axes"] == ("vision_embed", "embed") and lin.fc2 is None


# ---------------------------------------------------------------------------------------------
# Projector


@pytest.mark.parametrize("kind", ["mlp2x_gelu", "linear"])
def test_projector_parity(kind, tmp_path):
    torch.manual_seed(3)
    if kind == "mlp2x_gelu":
        ref = torch.nn.Sequential(torch.nn.Linear(32, 24), torch.nn.GELU(), torch.nn.Linear(24, 24))
    else:
        ref = torch.nn.Linear(32, 24)
    tensors = {"model.mm_projector." + k: v.detach().numpy() for k, v in ref.state_dict().items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    reader = SafetensorsReader(str(tmp_path))

    def make(rngs):
        return Projector(kind, 32, 24, Runtime(), rngs=rngs)

    rules = projector_rules(kind, prefix="", hf_prefix="model.")
    values = import_tensors(reader, rules, param_shapes(abstract_model(make)))
    proj = materialize(make, values)
    x = torch.randn(2, 5, 32)
    with torch.no_grad():
        expected = ref(x).numpy()
    np.testing.assert_allclose(np.asarray(proj(x.numpy())), expected, atol=1e-5, rtol=0)
    exported = dict(export_tensors(flat_values(nnx.state(proj, nnx.Param)), rules))
    assert set(exported) == set(tensors)
    for k, v in tensors.items():
        np.testing.assert_array_equal(exported[k], v)


def test_projector_unknown_kind():
    with pytest.raises(ValueError, match=r"unknown projector kind 'mlp3x_gelu'; choose one of mlp2x_gelu, linear"):
        Projector("mlp3x_gelu", 8, 8, Runtime(), rngs=nnx.Rngs(0))
    with pytest.raises(ConversionError, match=r"unknown projector kind 'identity'"):
        projector_rules("identity")
