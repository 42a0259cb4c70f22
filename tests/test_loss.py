"""The fused chunked cross-entropy: value and gradients equal the dense computation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wings_jax.training.loss import chunked_cross_entropy


def _inputs(b=2, length=12, h=8, vocab=20):
    ks = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(ks[0], (b, length, h))
    kernel = jax.random.normal(ks[1], (h, vocab))
    targets = jax.random.randint(ks[2], (b, length), 0, vocab)
    weights = (jax.random.uniform(ks[3], (b, length)) > 0.3).astype(jnp.float32)
    return hidden, kernel, targets, weights


def _dense(hidden, kernel, targets, weights):
    logp = jax.nn.log_softmax(hidden @ kernel, axis=-1)
    return -jnp.sum(jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0] * weights)


@pytest.mark.parametrize("chunk", [3, 12])
def test_value_and_gradients_equal_dense_cross_entropy(chunk):
    hidden, kernel, targets, weights = _inputs()
    loss = lambda h, k: 2.5 * chunked_cross_entropy(h, k, targets, weights, chunk)  # noqa: E731  (cotangent != 1)
    value, grads = jax.value_and_grad(loss, argnums=(0, 1))(hidden, kernel)
    want_value, want_grads = jax.value_and_grad(lambda h, k: 2.5 * _dense(h, k, targets, weights),
                                                argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)


def test_frozen_lm_head_costs_no_kernel_gradient():
    """Differentiating only the hidden states (stage 1: LM head frozen) skips the kernel's gradient matmul."""
    hidden, kernel, targets, weights = _inputs(length=64, h=64, vocab=512)

    def flops(argnums):
        fn = jax.grad(lambda h, k: chunked_cross_entropy(h, k, targets, weights, 64), argnums=argnums)
        return jax.jit(fn).lower(hidden, kernel).compile().cost_analysis()["flops"]

    matmul = 2 * 2 * 64 * 64 * 512  # one (B*L, H) x (H, V) product (one chunk: cost analysis counts a loop body once)
    assert flops((0, 1)) - flops(0) > 0.9 * matmul
    got = jax.grad(lambda h: chunked_cross_entropy(h, kernel, targets, weights, 16))(hidden)
    want = jax.grad(lambda h: _dense(h, kernel, targets, weights))(hidden)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)


def test_length_not_a_multiple_of_the_chunk_is_refused():
    hidden, kernel, targets, weights = _inputs()
    with pytest.raises(ValueError, match="not a multiple of the loss chunk 5"):
        chunked_cross_entropy(hidden, kernel, targets, weights, 5)
