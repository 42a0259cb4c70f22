"""AttentionInputs: the one description of queries and keys a model call builds (with or without a cache);
a cache grown and extended (with images too, under causal_images) gives what one prefill gives."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wings_fixtures import TINY_LLM, TINY_VISION, jnp_batch, make_batch, tiny_model
from wings_jax.model.cache import AttentionInputs, DecodeCache, grown

SIZE, TOKENS = TINY_VISION.image_size, (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2


def _cache(positions, segments):
    return DecodeCache(layers={}, positions=jnp.asarray(positions), segments=jnp.asarray(segments))


def test_without_a_cache_the_keys_are_the_queries():
    positions, segments = jnp.array([[0, 1, 2, 0]]), jnp.array([[1, 1, 1, 0]])
    inputs = AttentionInputs.build(positions, segments)
    assert inputs.slots is None and inputs.key_positions is positions and inputs.key_segments is segments
    text = jnp.array([[1, 0, 1, 0]])
    assert inputs.keys(text, None) is text


def test_with_a_cache_tokens_go_to_slot_position_and_padding_is_dropped():
    cache = _cache([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]], [[1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    positions = jnp.array([[2, 3], [0, 0]])
    segments = jnp.array([[1, 1], [1, 0]])  # row 1's second token is padding
    inputs = AttentionInputs.build(positions, segments, cache)
    np.testing.assert_array_equal(inputs.slots, [[2, 3], [0, 5]])
    assert inputs.key_fill == 4  # the latest query sits at slot 3: no query sees a later slot
    np.testing.assert_array_equal(inputs.key_positions, [[0, 1, 2, 3, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.key_segments, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    # per-key values of another attention (the textual learner's keys) follow the same slots
    cached_text = jnp.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.keys(jnp.array([[0, 1], [1, 1]]), cached_text),
                                  [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.keys(jnp.array([[1, 1], [1, 1]]), None), [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])


def test_a_compiled_decode_step_transposes_no_cached_keys():
    """The cache is stored (layers, B, heads, slots, head_dim), the layout the attention reads: the compiled
    extend block (main, textual-learner and image caches) holds no transpose or copy of a cache-sized array.
    (Batch 2: at batch 1 XLA's CPU matrix-vector dot still wants one transposed operand per attention.)"""
    import re


    from wings_fixtures import tiny_model
    from wings_jax.data.assemble import Prompt
    from wings_jax.inference import Engine, Sampling, pad_prompts

    engine, slots, length = Engine(tiny_model()), 77, 8  # 77: a slot count no other dimension has
    prompt = Prompt(np.arange(length, dtype=np.int32), np.arange(length, dtype=np.int32), np.arange(length) >= 3,
                    np.zeros((0, 28, 28, 3), np.float32), np.zeros(0, bool))
    lengths, settings, key = np.full(2, length, np.int32), Sampling().values(), jax.random.key(0)
    tokens, cache = engine._steps.prefill(engine.state, pad_prompts([prompt] * 2, length), lengths, key, settings,
                                          max_length=slots)
    assert cache.layers["k"][0].shape[-2] == cache.layers["text_k"][0].shape[-2] == slots  # per-layer arrays
    hlo = engine._steps.extend_block.lower(engine.state, cache, tokens, jnp.asarray(lengths), jnp.int32(1),
                                           jnp.zeros(2, bool), key, settings, jnp.asarray([-1]), np.int32(2),
                                           block=2).compile().as_text()
    moved = re.findall(r"= \w+\[([\d,]*)\]\S* (?:transpose|copy)\(", hlo)
    assert not [shape for shape in moved if shape.split(",").count(str(slots)) and shape.count(",") >= 3]  # (B, heads, S, D)-sized


@pytest.mark.parametrize("stage,kv_heads", [("finetune", 2), ("finetune", 4), ("pretrain", 2), ("pretrain", 4)])
@pytest.mark.parametrize("separate", [False, True])  # stacked layers, or per-layer modules and caches (inference)
def test_prefill_then_extend_equals_prefill_of_the_whole(stage, kv_heads, separate):
    """A conversation read in pieces (prefill A with an image, grow the cache, extend B with padding past the
    end, extend one token C) gives the logits of one prefill of A + B + C: learners, router, GQA and MHA."""
    model = tiny_model(stage, llm=dataclasses.replace(TINY_LLM, num_kv_heads=kv_heads), seed=3)
    if separate:
        model = model.with_separate_layers()
    items = [1, 2, 3, 4, "img", *range(5, 20)]
    n = len(items) - 1 + TOKENS
    a, b = 12, n - 1  # A: 12 tokens, the image's among them; B: up to the last token; C: the last token
    whole = make_batch([items], TOKENS, SIZE, n, max_images=1)
    full, _ = model.prefill(jnp_batch(whole), max_length=n)
    first = {**whole, "segment_ids": np.where(np.arange(n) < a, whole["segment_ids"], 0)}
    _, cache = model.prefill(jnp_batch(first), max_length=16)
    cache = grown(cache, 40)
    first_layer = lambda name: jax.tree.leaves(cache.layers[name])[0]  # noqa: E731
    assert first_layer("k").shape[-2] == cache.positions.shape[1] == 40
    assert first_layer("image_k").shape[-2] == TOKENS
    padding = 3  # past the cache's end: their writes are dropped
    tokens = np.concatenate([whole["tokens"][:, a:b], np.zeros((1, padding), np.int32)], axis=1)
    positions = np.concatenate([np.arange(a, b), np.full(padding, 40)])[None].astype(np.int32)
    middle, cache = model.extend(jnp.asarray(tokens), jnp.asarray(positions), cache)
    last, _ = model.extend(jnp.asarray(whole["tokens"][:, b:]), jnp.asarray([[b]], jnp.int32), cache)
    pieces = np.concatenate([middle[0, :b - a], last[0]])
    np.testing.assert_allclose(pieces, np.asarray(full[0, a:]), rtol=0, atol=1e-6)


@pytest.mark.parametrize("stage,kv_heads", [("finetune", 2), ("finetune", 4), ("pretrain", 2), ("pretrain", 4)])
@pytest.mark.parametrize("separate", [False, True])
def test_extend_with_an_image_under_causal_images_equals_prefill_of_the_whole(stage, kv_heads, separate):
    """With causal_images an image read by ``extend`` changes no earlier token: prefill A (an image), grow the
    cache (slots and image-token room, more than needed), extend B (a second image among its tokens, padding
    past the end), extend one token C: the logits of one prefill of A + B + C."""
    model = tiny_model(stage, llm=dataclasses.replace(TINY_LLM, num_kv_heads=kv_heads), seed=3, causal_images=True)
    if separate:
        model = model.with_separate_layers()
    items = [1, 2, 3, 4, "img", 5, 6, 7, 8, 9, "img", *range(10, 16)]
    n = len(items) - 2 + 2 * TOKENS
    a, b = 4 + TOKENS + 2, n - 1  # A: up to two tokens after the first image; B: the second image, up to the last
    whole = make_batch([items], TOKENS, SIZE, n)
    full, _ = model.prefill(jnp_batch(whole), max_length=n)
    first = {**whole, "segment_ids": np.where(np.arange(n) < a, whole["segment_ids"], 0),
             "images": whole["images"][:, :1], "image_mask": whole["image_mask"][:, :1]}
    _, cache = model.prefill(jnp_batch(first), max_length=16)
    cache = grown(cache, 64, image_tokens=3 * TOKENS)
    first_layer = lambda name: jax.tree.leaves(cache.layers[name])[0]  # noqa: E731
    assert first_layer("image_k").shape[-2] == cache.learners["image_segments"].shape[1] == 3 * TOKENS
    padding = 3
    tokens = np.concatenate([whole["tokens"][:, a:b], np.zeros((1, padding), np.int32)], axis=1)
    positions = np.concatenate([np.arange(a, b), np.full(padding, 64)])[None].astype(np.int32)
    middle, cache = model.extend(jnp.asarray(tokens), jnp.asarray(positions), cache,
                                 jnp.asarray(whole["images"][:, 1:]), jnp.asarray(whole["image_mask"][:, 1:]))
    np.testing.assert_array_equal(cache.learners["image_segments"][0], np.repeat([1, 1, 0], TOKENS))
    last, _ = model.extend(jnp.asarray(whole["tokens"][:, b:]), jnp.asarray([[b]], jnp.int32), cache)
    pieces = np.concatenate([middle[0, :b - a], last[0]])
    np.testing.assert_allclose(pieces, np.asarray(full[0, a:]), rtol=0, atol=1e-5)


def test_extend_refuses_images_the_earlier_tokens_would_see():
    model = tiny_model()  # causal_images=False: an earlier token's visual learner sees every image of its row
    images = jnp.zeros((1, 1, SIZE, SIZE, 3))
    with pytest.raises(ValueError, match="causal_images"):
        model.extend(jnp.zeros((1, 4), jnp.int32), jnp.zeros((1, 4), jnp.int32), None, images, jnp.ones((1, 1), bool))


def test_a_cache_does_not_shrink():
    cache = _cache(np.zeros((1, 4), np.int32), np.zeros((1, 4), np.int32))
    with pytest.raises(ValueError, match="shrink"):
        grown(cache, 3)
    with pytest.raises(ValueError, match="shrink"):
        grown(cache.replace(learners={"image_segments": jnp.zeros((1, 2), jnp.int32)}), 4, image_tokens=1)
