"""wings.enabled=False: a LLaVA-style model with no Wings branch (no learner or router parameters, no work)."""
import os

import numpy as np
import pytest
import torch
from flax import nnx

from hf_fixtures import make_qwen
from wings_fixtures import TINY_LLM, TINY_VISION, jnp_batch, make_batch, tiny_model
from wings_jax.config import load_config
from wings_jax.convert.__main__ import main as convert_main
from wings_jax.checkpoint import load_model
from wings_jax.data.assemble import Prompt
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.inference import Engine
from wings_jax.flops import count_flops
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import Qwen2
from wings_jax.model.runtime import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import flat_values, materialize, param_shapes
from wings_jax.training.loop import train

T = (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def plain_model(seed=0) -> WingsModel:
    cfg = WingsModelConfig(llm=TINY_LLM, vision=TINY_VISION, wings=WingsConfig(enabled=False))
    return WingsModel(cfg, Runtime(), rngs=nnx.Rngs(seed))


def test_parameters_are_the_wings_model_without_its_branch():
    plain = param_shapes(nnx.eval_shape(plain_model))
    wings = param_shapes(nnx.eval_shape(lambda: tiny_model(randomize_b=False)))
    assert plain == {k: v for k, v in wings.items() if not k.startswith("llm/layers/side/")}
    assert any(k.startswith("llm/layers/side/") for k in wings)
    cfg = WingsModelConfig(llm=TINY_LLM, vision=TINY_VISION, wings=WingsConfig(enabled=False))
    costs = count_flops(cfg, batch=1, seq_len=32, images_per_row=1, trainable={"llm"})
    assert costs.forward["learners"] == costs.forward["router"] == 0
    with pytest.raises(ValueError, match="reference"):
        WingsConfig(enabled=False, mixing="reference")


def test_equals_the_base_llm_with_images_placed():
    model = plain_model()
    batch = jnp_batch(make_batch([[5, 6, 7, "img", 8, 9], [5, 6, 7, 8, 9, 10, 11]], T, TINY_VISION.image_size, 16))
    x, attn, learners = model._inputs(batch, cache=None)
    assert learners is None  # nothing is computed for learners or routers
    llm = {k[len("llm/"):]: v for k, v in flat_values(nnx.state(model, nnx.Param)).items() if k.startswith("llm/")}
    base = materialize(lambda rngs: Qwen2(TINY_LLM, Runtime(), rngs=rngs), llm)
    hidden, _ = base.hidden_states(x, attn)
    valid = np.asarray(batch["segment_ids"]) > 0
    diff = np.abs(np.asarray(model(batch)) - np.asarray(base.logits(hidden)))[valid].max()
    assert diff < 1e-6, diff


def test_cached_generation_equals_recomputation():
    model = plain_model(seed=1)
    rng = np.random.RandomState(0)
    tokens = np.concatenate([rng.randint(10, 90, 3), np.full(T, IMAGE_TOKEN_ID), rng.randint(10, 90, 4)]).astype(np.int32)
    prompt = Prompt(tokens, np.arange(len(tokens), dtype=np.int32), tokens != IMAGE_TOKEN_ID,
                    rng.uniform(-1, 1, (1, TINY_VISION.image_size, TINY_VISION.image_size, 3)).astype(np.float32),
                    np.ones(1, bool))
    engine = Engine(model)
    cached = engine.generate([prompt], 6, recompute=False)
    assert cached == engine.generate([prompt], 6, recompute=True)


def test_import_hf_no_wings_matches_transformers_and_exports(tmp_path, capsys):
    llm_dir, ckpt = str(tmp_path / "qwen"), str(tmp_path / "ckpt")
    qwen = make_qwen(llm_dir, "qwen2.5", vocab_size=96)
    assert convert_main(["import-hf", "--llm", llm_dir, "--out", ckpt, "--no-wings"]) == 0
    model, _ = load_model(ckpt)
    assert not model.cfg.wings.enabled
    assert not any(k.startswith("llm/layers/side/") for k in flat_values(nnx.state(model, nnx.Param)))
    ids = np.random.RandomState(4).randint(0, 96, (1, 7)).astype(np.int32)
    with torch.no_grad():
        expected = qwen(torch.tensor(ids, dtype=torch.long)).logits.numpy()
    batch = {"tokens": ids, "positions": np.arange(7)[None].astype(np.int32), "segment_ids": np.ones((1, 7), np.int32)}
    assert np.abs(np.asarray(model(jnp_batch(batch))) - expected).max() < 1e-4
    assert convert_main(["export-hf-llm", "--ckpt", ckpt, "--out", str(tmp_path / "llm"), "--dtype", "float32"]) == 0
    assert convert_main(["export-wings", "--ckpt", ckpt, "--out", str(tmp_path / "w")]) == 2
    assert "export-hf-llm" in capsys.readouterr().err


@pytest.mark.parametrize("config", ["demo.py", "pretrain.py"])
def test_any_recipe_trains_it_without_learner_groups(config, tmp_path):
    demo = ensure_demo_dataset(str(tmp_path / "data"), num_records=64)
    overrides = ["model.wings.enabled=False", "train.steps=2", "train.global_batch_size=8", "data.max_len=64",
                 "train.loss_chunk=64", "checkpoint.every=100", "checkpoint.async_save=False",
                 "runtime.dtype=float32", "runtime.remat=none"]
    cfg = load_config(os.path.join(ROOT, "configs", config), overrides)
    cfg.unlock()
    demo_cfg = load_config(os.path.join(ROOT, "configs", "demo.py"))
    cfg.model.llm, cfg.model.vision = demo_cfg.model.llm, demo_cfg.model.vision  # tiny shapes
    cfg.model.wings.router_max_len = 128
    cfg.data.sources, cfg.data.tokenizer = demo.source_configs(), demo.tokenizer_dir
    cfg.lock()
    workdir = str(tmp_path / "run")
    result = train(cfg, workdir)
    assert result["step"] == 2 and np.isfinite(result["metrics"]["loss"])
    trained = {k for k in result["metrics"] if k.startswith("learning_rate/")}
    assert trained == ({"learning_rate/projector"} if config == "pretrain.py" else
                       {"learning_rate/llm", "learning_rate/projector"})
    model, _ = load_model(workdir)
    assert not model.cfg.wings.enabled
