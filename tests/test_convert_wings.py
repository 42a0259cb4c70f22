"""The released original layout: reference-mode parity, exact round trips, and the conversion CLI."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from safetensors.numpy import load_file
from transformers import AutoModelForCausalLM

from hf_fixtures import make_qwen
from torch_wings_reference import ReleasedWings
from wings_fixtures import make_released_checkpoint
from wings_jax.convert.__main__ import main as convert_main
from wings_jax.checkpoint import load_model
from wings_jax.convert.hf_io import ConversionError
from wings_jax.convert.wings_params import import_wings
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.qwen import positions_from_segments

SIZE, TOKENS = 56, 16  # tiny released tower: 56 px, patch 14 -> 16 tokens per image


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("released"))
    make_released_checkpoint(directory, image_size=SIZE)
    return directory


def _sample(ids, pixels=None):
    tokens = []
    for t in ids:
        tokens += [IMAGE_TOKEN_ID] * TOKENS if t == IMAGE_TOKEN_ID else [t]
    n = len(tokens)
    batch = {"tokens": np.asarray([tokens], np.int32), "segment_ids": np.ones((1, n), np.int32)}
    batch["positions"] = np.asarray(positions_from_segments(jnp.asarray(batch["segment_ids"])))
    batch["images"] = np.zeros((1, 1, SIZE, SIZE, 3), np.float32) if pixels is None else pixels[None, None]
    batch["image_mask"] = np.asarray([[pixels is not None]])
    return batch


@pytest.mark.parametrize("case", ["image", "text_long", "text_short"])
def test_reference_mode_reproduces_the_released_forward(released, case):
    rng = np.random.RandomState(0)
    reference = ReleasedWings(released)
    model, meta = import_wings(released)
    assert meta["source_dtype"] == "bfloat16" and model.cfg.wings.mixing == "reference"
    pixels = None
    if case == "image":
        ids = list(rng.randint(0, 96, 8)) + [IMAGE_TOKEN_ID] + list(rng.randint(0, 96, 12))
        pixels = rng.uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
        torch_pixels = torch.tensor(pixels).permute(2, 0, 1)[None]
    else:  # the text-only branch attends to a blank image; shorter than one image it is truncated
        ids = list(rng.randint(0, 96, 30 if case == "text_long" else 10))
        torch_pixels = None
    expected = reference.logits([int(i) for i in ids], torch_pixels)
    ours = np.asarray(model({k: jnp.asarray(v) for k, v in _sample(ids, pixels).items()}))[0]
    assert np.abs(ours - expected).max() < 1e-4, np.abs(ours - expected).max()
    # the released quirks matter: the corrected mixing gives different logits on the same weights
    corrected, _ = import_wings(released, mixing="corrected")
    other = np.asarray(corrected({k: jnp.asarray(v) for k, v in _sample(ids, pixels).items()}))[0]
    assert np.abs(other - expected).max() > 1e-3


def test_round_trip_is_bytes_exact(released, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "export")
    assert convert_main(["import-wings", "--src", released, "--out", ckpt]) == 0
    assert convert_main(["export-wings", "--ckpt", ckpt, "--out", out]) == 0
    original = load_file(os.path.join(released, "model.safetensors"))
    exported = load_file(os.path.join(out, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    for name, value in original.items():
        assert exported[name].dtype == value.dtype, name
        assert exported[name].tobytes() == value.tobytes(), name
    # the exported directory imports again, to the same model
    again, _ = import_wings(out)
    first, _ = load_model(ckpt)
    batch = {k: jnp.asarray(v) for k, v in _sample([1, 2, 3, 4, IMAGE_TOKEN_ID, 5, 6]).items()}
    np.testing.assert_array_equal(np.asarray(again(batch)), np.asarray(first(batch)))
    config = json.loads(open(os.path.join(out, "config.json")).read())
    assert config["model_type"] == "wings_qwen2" and config["lora_dim"] == 8 and config["system_prompt_length"] == 5


def test_partial_learner_layers_and_pretrain_stage(tmp_path):
    src = str(tmp_path / "src")
    make_released_checkpoint(src, router=False, learner_layers=[1], image_size=SIZE)
    model, meta = import_wings(src)
    assert model.cfg.wings.stage == "pretrain" and model.cfg.wings.learner_layers == (1,)
    ids = list(np.random.RandomState(1).randint(0, 96, 6)) + [IMAGE_TOKEN_ID] + [7, 8, 9]
    pixels = np.random.RandomState(2).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    expected = ReleasedWings(src).logits([int(i) for i in ids], torch.tensor(pixels).permute(2, 0, 1)[None])
    ours = np.asarray(model({k: jnp.asarray(v) for k, v in _sample(ids, pixels).items()}))[0]
    assert np.abs(ours - expected).max() < 1e-4
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "out")
    assert convert_main(["import-wings", "--src", src, "--out", ckpt]) == 0
    assert convert_main(["export-wings", "--ckpt", ckpt, "--out", out]) == 0
    original, exported = load_file(os.path.join(src, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert sorted(original) == sorted(exported)
    assert all(original[k].tobytes() == exported[k].tobytes() for k in original)


def test_export_hf_llm_loads_in_transformers(released, tmp_path):
    ckpt, out = str(tmp_path / "ckpt"), str(tmp_path / "llm")
    assert convert_main(["import-wings", "--src", released, "--out", ckpt, "--mixing", "corrected"]) == 0
    assert convert_main(["export-hf-llm", "--ckpt", ckpt, "--out", out, "--dtype", "float32"]) == 0
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    model, _ = load_model(ckpt)
    ids = np.random.RandomState(3).randint(0, 96, (2, 9)).astype(np.int32)
    with torch.no_grad():
        expected = hf(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    ours = np.asarray(model.llm(jnp.asarray(ids)))  # the language model alone: no learners
    assert np.abs(ours - expected).max() < 1e-4


def test_import_hf_builds_a_fresh_wings_model(tmp_path):
    from transformers import SiglipVisionConfig, SiglipVisionModel

    llm_dir, vision_dir, ckpt = tmp_path / "qwen", tmp_path / "siglip", str(tmp_path / "ckpt")
    qwen = make_qwen(llm_dir, "qwen2.5", vocab_size=96)
    torch.manual_seed(0)
    SiglipVisionModel(SiglipVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                         num_attention_heads=2, image_size=28, patch_size=14)).save_pretrained(vision_dir)
    args = ["import-hf", "--llm", str(llm_dir), "--vision", str(vision_dir), "--out", ckpt, "--stage", "finetune",
            "--lora-rank", "4", "--router-max-len", "64"]
    assert convert_main(args) == 0
    model, meta = load_model(ckpt)
    assert model.cfg.vision.num_layers == 2 and model.cfg.wings.lora_rank == 4 and meta["source"] == "hf"
    ids = np.random.RandomState(4).randint(0, 96, (1, 7)).astype(np.int32)
    with torch.no_grad():
        expected = qwen(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    batch = {"tokens": ids, "positions": np.arange(7)[None].astype(np.int32), "segment_ids": np.ones((1, 7), np.int32)}
    ours = np.asarray(model({k: jnp.asarray(v) for k, v in batch.items()}))
    assert np.abs(ours - expected).max() < 1e-4  # fresh learners add exactly nothing
    assert convert_main(args) == 2  # refuses to overwrite


def test_import_errors_name_the_problem(tmp_path, released, capsys):
    src = tmp_path / "bad"
    src.mkdir()
    config = json.loads(open(os.path.join(released, "config.json")).read())
    tensors = load_file(os.path.join(released, "model.safetensors"))
    del tensors["model.layers.1.attn_t_pool.k_proj.1.weight"]
    from safetensors.numpy import save_file

    save_file(tensors, str(src / "model.safetensors"), metadata={"format": "pt"})
    (src / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConversionError, match=r"missing tensors \(1\): model\.layers\.1\.attn_t_pool\.k_proj\.1\.weight"):
        import_wings(str(src))
    (src / "config.json").write_text(json.dumps({**config, "mm_vision_tower": "mystery", "vision_config": None}))
    assert convert_main(["import-wings", "--src", str(src), "--out", str(tmp_path / "o")]) == 2
    assert "--vision-heads" in capsys.readouterr().err


@pytest.mark.parametrize("vision_layers", [1, 3])  # the LLM has 2 layers: a shallower and a deeper tower
def test_import_wings_with_a_tower_deeper_or_shallower_than_the_llm(tmp_path, vision_layers):
    src = str(tmp_path / "src")
    make_released_checkpoint(src, image_size=SIZE, vision_layers=vision_layers)
    model, _ = import_wings(src)
    assert model.cfg.vision.num_layers == vision_layers and model.cfg.llm.num_layers == 2
    ids = [5, 6, IMAGE_TOKEN_ID, 7, 8, 9]
    pixels = np.random.RandomState(5).uniform(-1, 1, (SIZE, SIZE, 3)).astype(np.float32)
    expected = ReleasedWings(src).logits(ids, torch.tensor(pixels).permute(2, 0, 1)[None])
    ours = np.asarray(model({k: jnp.asarray(v) for k, v in _sample(ids, pixels).items()}))[0]
    assert np.abs(ours - expected).max() < 1e-4


def test_import_hf_names_a_missing_directory(tmp_path, capsys):
    missing = str(tmp_path / "no-such-qwen")
    assert convert_main(["import-hf", "--llm", missing, "--out", str(tmp_path / "out")]) == 2
    assert f"{missing}: does not exist" in capsys.readouterr().err


def test_tower_settings_precedence(tmp_path, released):
    """flags > the checkpoint's vision_config > a local tower directory's config.json > the known hub towers."""
    from transformers import SiglipVisionConfig

    from wings_jax.convert.hf_io import SafetensorsReader
    from wings_jax.convert.wings_params import wings_config_from_released

    reader = SafetensorsReader(released)
    base = {k: v for k, v in json.loads(open(os.path.join(released, "config.json")).read()).items()
            if k != "vision_config"}
    local = tmp_path / "siglip-so400m-patch14-384"  # named like a known tower: the directory's config wins
    SiglipVisionConfig(hidden_size=24, num_attention_heads=3, layer_norm_eps=1e-5, image_size=SIZE + 1,
                       patch_size=14).save_pretrained(local)

    def tower(hf, flags=None):
        vision = wings_config_from_released(hf, reader, "config.json", "reference", flags)[0].vision
        return vision.num_heads, vision.layer_norm_eps, vision.image_size

    # the hub table alone (so400m: 16 heads, 1e-6, 384 px) disagrees with these weights' 4 x 4 patch grid
    with pytest.raises(ConversionError, match="image_size 384 gives 27 patches"):
        tower({**base, "mm_vision_tower": "google/siglip-so400m-patch14-384"})
    assert tower({**base, "mm_vision_tower": str(local)}) == (3, 1e-5, SIZE + 1)
    described = {**base, "mm_vision_tower": str(local), "vision_config": {"num_attention_heads": 2, "image_size": SIZE}}
    assert tower(described) == (2, 1e-5, SIZE)
    assert tower(described, {"num_heads": 4, "layer_norm_eps": None, "image_size": None}) == (4, 1e-5, SIZE)
