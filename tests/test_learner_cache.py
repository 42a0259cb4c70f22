"""The textual learner's decode cache layouts (``runtime.text_cache``): prefill + extend give the teacher-forced
forward's logits with each, and the low-rank layout keeps per slot 2 rank values per layer plus the embeddings
once. (Greedy generation with each layout equals recomputation: tests/test_generate.py.)"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from wings_fixtures import TINY_LLM, TINY_MHA_LLM, TINY_VISION, jnp_batch, make_batch, strong_model, tiny_model
from wings_jax.model.runtime import TEXT_CACHES, Runtime

T = (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2
ROWS = [[5, 6, 7, 8, "img", 9, 10, 11, 12, 13, 14, 15, 16], [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20]]
PREFIX = 10  # prefill the first 10 slots (row 0's image among them), then extend by 1, 2 and 3 tokens


@pytest.mark.parametrize("text_cache,llm,learner_layers", [
    ("full", TINY_LLM, None), ("low_rank", TINY_LLM, None), ("full", TINY_MHA_LLM, None),
    ("low_rank", TINY_MHA_LLM, None), ("low_rank", TINY_LLM, (1,)),
], ids=["full-gqa", "low_rank-gqa", "full-mha", "low_rank-mha", "low_rank-gqa-layer1"])
def test_prefill_and_extend_equal_the_teacher_forced_forward(text_cache, llm, learner_layers):
    model = strong_model(runtime=Runtime(text_cache=text_cache), llm=llm, learner_layers=learner_layers)
    batch = jnp_batch(make_batch(ROWS, T, TINY_VISION.image_size, 16))
    expected = model(batch)
    graphdef, state = nnx.split(model)
    prefill = jax.jit(lambda state, batch: nnx.merge(graphdef, state).prefill(batch, 20))
    extend = jax.jit(lambda state, tokens, positions, cache: nnx.merge(graphdef, state).extend(tokens, positions, cache))
    per_slot = ("tokens", "positions", "segment_ids", "text_mask", "labels")
    logits, cache = prefill(state, {k: v[:, :PREFIX] if k in per_slot else v for k, v in batch.items()})
    got = [logits]
    for start, stop in ((PREFIX, PREFIX + 1), (PREFIX + 1, PREFIX + 3), (PREFIX + 3, 16)):
        logits, cache = extend(state, batch["tokens"][:, start:stop], batch["positions"][:, start:stop], cache)
        got.append(logits)
    np.testing.assert_allclose(jnp.concatenate(got, axis=1), expected, atol=2e-5, rtol=1e-5)


def test_low_rank_cache_keeps_two_rank_values_per_layer_and_slot_and_the_embeddings_once():
    """And the buffer naming a cache's growth relies on: in ``layers``, arrays not named ``image_*`` have their
    slots at axis -2; in ``learners``, at axis 1."""
    batch = jnp_batch(make_batch(ROWS, T, TINY_VISION.image_size, 16))
    slots, layers, rank = 24, TINY_LLM.num_layers, 8

    def cache_shapes(text_cache):
        graphdef, state = nnx.split(tiny_model(runtime=Runtime(text_cache=text_cache)))
        _, cache = jax.eval_shape(lambda state: nnx.merge(graphdef, state).prefill(batch, slots), state)
        return cache

    full, low = cache_shapes("full"), cache_shapes("low_rank")
    heads, d = TINY_LLM.num_heads, TINY_LLM.hidden_size // TINY_LLM.num_heads
    assert full.layers["text_k"].shape == full.layers["text_v"].shape == (layers, 2, heads, slots, d)
    assert "text_k" not in low.layers and "text_feats" not in full.learners
    assert low.layers["text_low"].shape == (layers, 2, 1, slots, 2 * rank)
    assert low.learners["text_feats"].shape == (2, slots, TINY_LLM.hidden_size)
    for cache in (full, low):
        assert all(a.shape[-2] == slots for name, a in cache.layers.items() if not name.startswith("image_"))
        assert all(a.shape[1] == slots for name, a in cache.learners.items() if not name.startswith("image_"))


def test_an_unknown_text_cache_is_refused_by_name():
    with pytest.raises(ValueError, match=r"runtime.text_cache='lowrank'; choose one of \('full', 'low_rank'\)"):
        Runtime(text_cache="lowrank")
    assert Runtime().text_cache in TEXT_CACHES
