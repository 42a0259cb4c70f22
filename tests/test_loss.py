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


@pytest.mark.parametrize("positions", [8, 4])  # every row fits (gathered) / a row has more (every position)
def test_labelled_positions_only_equal_dense_cross_entropy(positions):
    hidden, kernel, targets, weights = _inputs(length=16)
    weights = weights.at[0, :].set(0.0).at[0, 3:9].set(1.0)  # row 0: 6 labelled positions
    weights = weights.at[1, :].set(0.0).at[1, jnp.array([0, 7, 15])].set(1.0)
    loss = lambda h, k: 2.5 * chunked_cross_entropy(h, k, targets, weights, 4, positions=positions)  # noqa: E731
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(hidden, kernel)
    want_value, want_grads = jax.value_and_grad(lambda h, k: 2.5 * _dense(h, k, targets, weights),
                                                argnums=(0, 1))(hidden, kernel)
    np.testing.assert_allclose(value, want_value, rtol=1e-5)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    frozen_head = jax.jit(jax.grad(lambda h: loss(h, kernel)))(hidden)  # stage 1: the LM head not differentiated
    np.testing.assert_allclose(np.asarray(frozen_head), np.asarray(want_grads[0]), atol=1e-5)


def _head_rows(fn, *args) -> set[int]:
    """Rows per chunk of every LM-head product (a dot_general whose output ends in the vocabulary) in fn's jaxpr."""
    rows = set()

    def walk(jaxpr):
        for eq in jaxpr.eqns:
            if eq.primitive.name == "dot_general" and eq.outvars[0].aval.shape[-1] == 512:
                rows.add(eq.invars[0].aval.shape[1])
            for sub in jax.core.jaxprs_in_params(eq.params):
                walk(sub)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return rows


def test_labelled_positions_project_fewer_rows():
    """Besides the every-position fallback (64 rows per chunk), the head runs over the 16 gathered slots."""
    hidden, kernel, targets, weights = _inputs(length=64, h=64, vocab=512)
    def head_rows(positions):
        return _head_rows(lambda h: chunked_cross_entropy(h, kernel, targets, weights, 64, positions=positions), hidden)

    assert head_rows(0) == {64}
    assert head_rows(16) == {16, 64}


def test_bfloat16_logits_stay_close_to_float32():
    hidden, kernel, targets, weights = _inputs(length=32, h=32, vocab=300)
    hidden, kernel = hidden.astype(jnp.bfloat16), kernel.astype(jnp.bfloat16)

    def loss(dtype):
        return lambda h, k: chunked_cross_entropy(h, k, targets, weights, 16, logits_dtype=dtype)

    v32, g32 = jax.value_and_grad(loss(jnp.float32), argnums=(0, 1))(hidden, kernel)
    v16, g16 = jax.value_and_grad(loss(jnp.bfloat16), argnums=(0, 1))(hidden, kernel)
    assert v16.dtype == jnp.float32 and v16 != v32  # stored rounded, accumulated in float32
    np.testing.assert_allclose(v16, v32, rtol=2e-3)
    for got, want in zip(g16, g32):
        np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(want, np.float32), atol=0.1, rtol=0.05)


def test_flops_count_the_lm_head_over_the_loss_positions():
    from wings_jax.flops import count_flops
    from wings_jax.model.qwen import QwenConfig
    from wings_jax.model.wings import WingsModelConfig

    llm = QwenConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=4)
    cfg = WingsModelConfig(llm=llm, vision=None)
    every, some = (count_flops(cfg, batch=3, seq_len=64, images_per_row=0, trainable={"llm"}, loss_positions=p)
                   for p in (0, 16))
    assert every.forward["llm"] - some.forward["llm"] == 3 * (64 - 16) * 2 * 32 * 300
    others = lambda count: {k: v for k, v in count.forward.items() if k != "llm"}  # noqa: E731
    assert others(every) == others(some)
