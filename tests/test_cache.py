"""AttentionInputs: the one description of queries and keys a model call builds (with or without a cache)."""
import jax.numpy as jnp
import numpy as np

from wings_jax.model.cache import AttentionInputs, DecodeCache


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

    import jax

    from wings_fixtures import tiny_model
    from wings_jax.data.assemble import Prompt
    from wings_jax.inference import Engine, Sampling, pad_prompts

    engine, slots, length = Engine(tiny_model()), 77, 8  # 77: a slot count no other dimension has
    prompt = Prompt(np.arange(length, dtype=np.int32), np.arange(length, dtype=np.int32), np.arange(length) >= 3,
                    np.zeros((0, 28, 28, 3), np.float32), np.zeros(0, bool))
    lengths, settings, key = np.full(2, length, np.int32), Sampling().values(), jax.random.key(0)
    tokens, cache = engine._steps.prefill(engine.state, pad_prompts([prompt] * 2, length), lengths, key, settings,
                                          max_length=slots)
    assert cache.layers["k"].shape[-2] == cache.layers["text_k"].shape[-2] == slots
    hlo = engine._steps.extend_block.lower(engine.state, cache, tokens, jnp.asarray(lengths), jnp.int32(1),
                                           jnp.zeros(2, bool), key, settings, jnp.asarray([-1]), np.int32(2),
                                           block=2).compile().as_text()
    moved = re.findall(r"= \w+\[([\d,]*)\]\S* (?:transpose|copy)\(", hlo)
    assert not [shape for shape in moved if shape.split(",").count(str(slots)) and shape.count(",") >= 3]  # (B, heads, S, D)-sized
