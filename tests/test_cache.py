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
    np.testing.assert_array_equal(inputs.key_positions, [[0, 1, 2, 3, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.key_segments, [[1, 1, 1, 1, 0], [1, 0, 0, 0, 0]])
    # per-key values of another attention (the textual learner's keys) follow the same slots
    cached_text = jnp.array([[0, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.keys(jnp.array([[0, 1], [1, 1]]), cached_text),
                                  [[0, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    np.testing.assert_array_equal(inputs.keys(jnp.array([[1, 1], [1, 1]]), None), [[0, 0, 1, 1, 0], [1, 0, 0, 0, 0]])
