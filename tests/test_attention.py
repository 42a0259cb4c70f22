"""attend(): masks from compact descriptors, the fused router channels, and linear memory."""
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wings_jax.model.attention import attend, prefix_lengths


def _inputs(b=2, tq=16, tk=16, n=4, kv=2, d=8, seed=0):
    ks = jax.random.split(jax.random.key(seed), 4)
    q = jax.random.normal(ks[0], (b, tq, n, d))
    k = jax.random.normal(ks[1], (b, tk, kv, d))
    v = jax.random.normal(ks[2], (b, tk, kv, d))
    extra = jax.random.normal(ks[3], (b, tk, 2))
    return q, k, v, extra


def _explicit(q, k, v, extra, q_pos, k_pos, q_seg, k_seg, causal):
    """The textbook computation with the (B, heads, Tq, Tk) probabilities materialised."""
    n, kv = q.shape[2], k.shape[2]
    k = jnp.repeat(k, n // kv, axis=2)
    v = jnp.repeat(v, n // kv, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
    mask = (q_seg[:, :, None] == k_seg[:, None, :]) & (k_seg[:, None, :] > 0)
    if causal:
        mask &= k_pos[:, None, :] <= q_pos[:, :, None]
    probs = jax.nn.softmax(jnp.where(mask[:, None], logits, -jnp.inf), axis=-1)
    probs = jnp.nan_to_num(probs)  # rows without keys -> 0
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    router = jnp.einsum("bqk,bkc->bqc", probs.sum(axis=1), extra)  # sum over heads of P, times W_r rows
    return out, router


@pytest.mark.parametrize("implementation", ["xla", "dot_product"])
@pytest.mark.parametrize("q_chunk", [4, 5, 512])  # 5: 16 queries in 4 chunks of 4 + a padded tail
def test_fused_router_equals_explicit_sum_over_heads(implementation, q_chunk):
    q, k, v, extra = _inputs()
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    seg = jnp.array([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16])  # packed row with padding, and a full row
    out, router = attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, extra_values=extra,
                         implementation=implementation, q_chunk=q_chunk)
    want_out, want_router = _explicit(q, k, v, extra, pos, pos, seg, seg, True)
    valid = np.asarray(seg) > 0
    np.testing.assert_allclose(np.asarray(out)[valid], np.asarray(want_out)[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(router)[valid], np.asarray(want_router)[valid], atol=1e-5)


@pytest.mark.parametrize("implementation", ["xla", "dot_product"])
def test_query_without_keys_gets_exact_zero_and_finite_gradients(implementation):
    q, k, v, _ = _inputs(tk=6)
    pos_q = jnp.broadcast_to(jnp.arange(16), (2, 16))
    pos_k = jnp.broadcast_to(jnp.arange(6), (2, 6))
    q_seg = jnp.ones((2, 16), jnp.int32)
    k_seg = jnp.array([[1] * 6, [0] * 6])  # the second sample has no keys at all (no image)

    def run(q, k, v):
        out, _ = attend(q, k, v, q_pos=pos_q, k_pos=pos_k, q_seg=q_seg, k_seg=k_seg, causal=False,
                        implementation=implementation)
        return out

    out = run(q, k, v)
    assert np.all(np.asarray(out[1]) == 0.0)
    grads = jax.grad(lambda *a: jnp.sum(run(*a) ** 2), argnums=(0, 1, 2))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    assert np.all(np.asarray(grads[0][1]) == 0.0)


def _layer_temp_bytes(length, chunk):
    """Compiled temporary memory of forward + backward of one attention call with router channels."""
    b, n, d = 1, 8, 64
    q = jax.ShapeDtypeStruct((b, length, n, d), jnp.float32)
    extra = jax.ShapeDtypeStruct((b, length, 2), jnp.float32)
    pos = jnp.broadcast_to(jnp.arange(length), (b, length))
    seg = jnp.ones((b, length), jnp.int32)

    def loss(q, k, v, extra):
        out, router = attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, extra_values=extra,
                             q_chunk=chunk)
        return jnp.sum(out) + jnp.sum(router)

    compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(q, q, q, extra).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_memory_grows_linearly_with_length():
    """With query chunks the (heads, L, L) probabilities never exist whole: doubling L doubles memory."""
    sizes = {length: _layer_temp_bytes(length, chunk=256) for length in (1024, 2048, 4096)}
    assert sizes[2048] / sizes[1024] < 2.6 and sizes[4096] / sizes[2048] < 2.6, sizes
    # without chunking the same computation is quadratic, which this test would catch
    unchunked = {length: _layer_temp_bytes(length, chunk=10**9) for length in (1024, 2048)}
    assert unchunked[2048] / unchunked[1024] > 3.5, unchunked


def test_memory_grows_linearly_for_lengths_not_a_multiple_of_the_chunk():
    """A length that q_chunk does not divide is still chunked (its last chunk padded), not run whole."""
    sizes = {length: _layer_temp_bytes(length, chunk=256) for length in (1000, 2000, 4000)}
    assert sizes[2000] / sizes[1000] < 2.6 and sizes[4000] / sizes[2000] < 2.6, sizes


@pytest.mark.parametrize("q_chunk", [5, 512])
def test_gradients_equal_the_explicit_computation(q_chunk):
    """The xla path's hand-written backward (values, router channels, GQA, packed rows, padding)."""
    q, k, v, extra = _inputs()
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    seg = jnp.array([[1] * 10 + [2] * 4 + [0] * 2, [1] * 16])
    w_out = jax.random.normal(jax.random.key(5), q.shape) * (seg > 0)[:, :, None, None]
    w_router = jax.random.normal(jax.random.key(6), (2, 16, 2)) * (seg > 0)[:, :, None]

    def loss(fn):
        def value(q, k, v, extra):
            out, router = fn(q, k, v, extra)
            return jnp.sum(out * w_out) + jnp.sum(router * w_router)
        return jax.grad(value, argnums=(0, 1, 2, 3))(q, k, v, extra)

    ours = loss(lambda *a: attend(*a[:3], q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True,
                                  extra_values=a[3], q_chunk=q_chunk))
    want = loss(lambda *a: _explicit(*a, pos, pos, seg, seg, True))
    for got, expected in zip(ours, want):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_bfloat16_backward_matmuls_take_bfloat16_operands_and_stay_close():
    """In a bf16 model the xla path's backward feeds its matmuls bf16 (accumulating in float32, as flash
    kernels do): every dot in the backward has bf16 operands, and the gradients stay within bf16 error of
    the float32 computation."""
    q, k, v, extra = _inputs(tq=64, tk=64, d=16)
    pos = jnp.broadcast_to(jnp.arange(64), (2, 64))
    seg = jnp.array([[1] * 40 + [2] * 20 + [0] * 4, [1] * 64])

    def grads(q, k, v):
        def value(q, k, v):
            out, router = attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True,
                                 extra_values=extra, q_chunk=16)
            return jnp.sum(jnp.sin(out.astype(jnp.float32))) + jnp.sum(router)
        return jax.grad(value, argnums=(0, 1, 2))(q, k, v)

    low = tuple(a.astype(jnp.bfloat16) for a in (q, k, v))
    hlo = jax.jit(grads).lower(*low).as_text()
    operands = [re.search(r": \((tensor<[^>]*>), (tensor<[^>]*>)\) ->", line).groups()
                for line in hlo.splitlines() if "stablehlo.dot_general" in line]
    # the router's channels (C=2, float32 W_r rows) are small matmuls kept in float32; every other is bf16
    big = [pair for pair in operands if not any(t.endswith("x2xf32>") for t in pair)]
    assert len(big) >= 5 and all(t.endswith("bf16>") for pair in big for t in pair), big
    got, want = grads(*low), grads(q, k, v)
    for g, w in zip(got, want):
        scale = float(jnp.max(jnp.abs(w)))
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(w), atol=0.03 * scale)


def test_attention_remat_policy_runs_no_second_flash_forward():
    """Remat "attention" keeps the attention outputs and log-sum-exp: it costs about what no remat
    costs, while "full" pays for a second attention forward."""
    from wings_jax.model.layers import REMAT_POLICIES

    b, t, n, d = 1, 128, 2, 32
    q = jax.random.normal(jax.random.key(0), (b, t, n, d))
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    seg = jnp.ones((b, t), jnp.int32)

    def layer(q):
        out, _ = attend(jnp.sin(q), q, q, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, q_chunk=t)
        return jnp.sum(jnp.sin(out))

    def flops(policy):
        fn = jax.value_and_grad(layer if policy == "none" else jax.checkpoint(layer, policy=REMAT_POLICIES[policy]))
        return jax.jit(fn).lower(q).compile().cost_analysis()["flops"]

    attention_forward = 2 * 2 * b * n * t * t * d
    assert flops("attention") - flops("none") < 0.1 * attention_forward
    assert flops("full") - flops("none") > 0.3 * attention_forward


@pytest.mark.parametrize("implementation", ["xla", "dot_product"])
def test_heads_first_keys_equal_keys_first(implementation):
    """A decode cache's (B, K, S, D) keys and values give the same outputs as (B, S, K, D) ones."""
    q, k, v, extra = _inputs(tq=3, tk=16)
    q_pos = jnp.broadcast_to(jnp.arange(8, 11), (2, 3))
    k_pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    q_seg, k_seg = jnp.ones((2, 3), jnp.int32), jnp.ones((2, 16), jnp.int32).at[1, 12:].set(0)
    kw = dict(q_pos=q_pos, k_pos=k_pos, q_seg=q_seg, k_seg=k_seg, causal=True, extra_values=extra,
              implementation=implementation)
    want = attend(q, k, v, **kw)
    got = attend(q, jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), heads_first=True, **kw)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


def test_prefix_lengths_double_up_to_the_key_count():
    assert prefix_lengths(100) == (16, 32, 64, 100)
    assert prefix_lengths(64) == (16, 32, 64)
    assert prefix_lengths(10) == (10,)


@pytest.mark.parametrize("heads_first", [False, True])
def test_attending_over_the_filled_prefix_equals_all_slots(heads_first):
    """With key_fill, a cache's first few slots, or many (other prefix lengths), give all slots' outputs, and
    slots past the prefix read are never touched (NaN there would poison the outputs)."""
    q, k, v, extra = _inputs(tq=2, tk=100)
    if heads_first:
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    k_pos = jnp.broadcast_to(jnp.arange(100), (2, 100))
    for fill in (3, 17, 40, 90):  # slots past fill hold stale keys: a cache's unfilled slots are never seen
        q_pos = jnp.array([[fill - 2, fill - 1], [fill - 1, fill - 1]])
        kw = dict(q_pos=q_pos, k_pos=k_pos, q_seg=jnp.ones((2, 2), jnp.int32), k_seg=jnp.ones((2, 100), jnp.int32),
                  causal=True, extra_values=extra, heads_first=heads_first)
        want = attend(q, k, v, **kw)
        read = min(n for n in prefix_lengths(100) if n >= fill)
        slot = jnp.arange(100)[:, None] if heads_first else jnp.arange(100)[:, None, None]
        poisoned = jnp.where(slot >= read, jnp.nan, v)
        got = jax.jit(lambda f, v: attend(q, k, v, key_fill=f, **kw))(jnp.int32(fill), poisoned)
        for a, b in zip(got, want):
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("router", [True, False])
@pytest.mark.parametrize("keys", ["right_padding", "holes"])  # holes: non-keys inside the row (image slots)
def test_padded_rows_take_the_mask_as_structure(monkeypatch, causal, router, keys):
    """rows='padded' on the jax.nn path: no mask array reaches jax.nn.dot_product_attention (causality by
    index, non-keys by the exclusion channel), and outputs, router sums and gradients equal the xla path."""
    q, k, v, extra = _inputs(n=4, kv=2, d=8)
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    q_seg = jnp.array([[1] * 12 + [0] * 4, [1] * 16])
    k_seg = q_seg if keys == "right_padding" else q_seg.at[:, :3].set(0).at[1, 7:9].set(0)
    extra = extra if router else None
    calls = []
    real = jax.nn.dot_product_attention

    def spy(*args, **kw):
        calls.append(kw)
        return real(*args, **kw)

    monkeypatch.setattr(jax.nn, "dot_product_attention", spy)

    def run(implementation, rows):
        def f(q, k, v, extra):
            out, summed = attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=q_seg, k_seg=k_seg, causal=causal,
                                 extra_values=extra, implementation=implementation, rows=rows,
                                 causal_by_index=True)
            loss = jnp.sum(jnp.sin(out)) + (0.0 if summed is None else jnp.sum(jnp.cos(summed)))
            return loss, (out, summed)
        (_, outs), grads = jax.value_and_grad(f, argnums=(0, 1, 2, 3) if router else (0, 1, 2), has_aux=True)(
            q, k, v, extra)
        return outs, grads

    (out, summed), grads = run("dot_product", "padded")
    assert calls and all(c.get("mask") is None and c.get("bias") is None and c["is_causal"] == causal for c in calls)
    (want_out, want_summed), want_grads = run("xla", "packed")
    np.testing.assert_allclose(np.asarray(out), np.asarray(want_out), atol=2e-6)
    if router:
        np.testing.assert_allclose(np.asarray(summed), np.asarray(want_summed), atol=2e-6)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)
    if causal and keys == "holes":  # the first three queries see no key: exactly 0
        assert not np.any(np.asarray(out)[:, :3])


def test_packed_rows_keep_the_dense_mask(monkeypatch):
    q, k, v, _ = _inputs()
    pos = jnp.broadcast_to(jnp.arange(16), (2, 16))
    seg = jnp.array([[1] * 10 + [2] * 6, [1] * 16])
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))
    attend(q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=True, implementation="dot_product")
    assert calls[0]["mask"] is not None and not calls[0]["is_causal"]


def _splash_case(case):
    """(q, k, v, extra, descriptors, causal): 'causal': packed rows, non-keys inside a row, padded queries,
    GQA and the router channels, lengths not a multiple of the kernel's 128-wide tiles; 'cross': the visual
    learner's shape (queries over fewer keys, no causality), one row without keys."""
    if case == "causal":
        q, k, v, extra = _inputs(tq=200, tk=200, n=4, kv=2, d=32)
        pos = jnp.broadcast_to(jnp.arange(200), (2, 200))
        q_seg = jnp.array([[1] * 120 + [2] * 70 + [0] * 10, [1] * 200])
        return q, k, v, extra, dict(q_pos=pos, k_pos=pos, q_seg=q_seg, k_seg=q_seg.at[1, 5:9].set(0)), True
    q, k, v, extra = _inputs(tq=130, tk=50, n=4, kv=4, d=32, seed=1)
    q_seg = jnp.array([[1] * 100 + [0] * 30, [1] * 130])
    k_seg = jnp.array([[1] * 50, [0] * 50])  # the second row has no image: its queries see nothing
    return q, k, v, extra, dict(q_pos=jnp.zeros((2, 130), jnp.int32), k_pos=jnp.zeros((2, 50), jnp.int32),
                                q_seg=q_seg, k_seg=k_seg), False


def _loss_and_grads(implementation, q, k, v, extra, masks, causal, **kw):
    def f(q, k, v, extra):
        out, summed = attend(q, k, v, causal=causal, extra_values=extra, implementation=implementation,
                             causal_by_index=True, **masks, **kw)
        return jnp.sum(jnp.sin(out)) + jnp.sum(jnp.cos(summed)), (out, summed)
    return jax.value_and_grad(f, argnums=(0, 1, 2, 3), has_aux=True)(q, k, v, extra)


@pytest.mark.parametrize("case", ["causal", "cross"])
def test_splash_equals_the_xla_path(case):
    """The splash kernel (interpreted on CPU): outputs, router sums and every gradient equal the xla path's;
    a query without keys gets exactly 0 and finite gradients."""
    q, k, v, extra, masks, causal = _splash_case(case)
    got = _loss_and_grads("splash", q, k, v, extra, masks, causal)
    want = _loss_and_grads("xla", q, k, v, extra, masks, causal)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert np.all(np.isfinite(np.asarray(g)))
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-6)
    if case == "cross":
        (_, (out, summed)), _ = got
        assert not np.any(np.asarray(out)[1]) and not np.any(np.asarray(summed)[1])


def test_splash_runs_the_kernel_only_where_it_can_express_the_mask():
    """Causality not by index (a cache's slots, reference mode) or a cache's heads-first keys: the xla path."""
    q, k, v, extra, masks, _ = _splash_case("causal")

    def kernels(**kw):
        jaxpr = jax.make_jaxpr(lambda q, k, v: attend(q, k, v, causal=True, implementation="splash", **masks,
                                                      **kw))(q, k, v)
        return str(jaxpr).count("pallas_call")

    assert kernels(causal_by_index=True) == 1
    assert kernels(causal_by_index=False) == 0
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    out, _ = attend(q, kh, vh, causal=True, implementation="splash", heads_first=True, causal_by_index=True, **masks)
    want, _ = attend(q, k, v, causal=True, **masks)
    np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-6)


def test_splash_runs_per_shard_under_a_mesh():
    """Under activation_sharding the kernel runs once per shard (batch over data x fsdp, key/value heads over
    tensor) and gives the unsharded result."""
    from wings_jax import sharding

    q, k, v, extra, masks, causal = _splash_case("causal")
    q, k, v, extra = (jnp.concatenate([a, a[::-1]]) for a in (q, k, v, extra))
    masks = {name: jnp.concatenate([a, a[::-1]]) for name, a in masks.items()}
    mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2, devices=jax.devices()[:8])
    with sharding.activation_sharding(mesh):
        step = jax.jit(lambda *a: _loss_and_grads("splash", *a, masks, causal))
        got = step(q, k, v, extra)
        assert "shard_map" in str(jax.make_jaxpr(step)(q, k, v, extra))
    want = _loss_and_grads("xla", q, k, v, extra, masks, causal)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), atol=2e-5, rtol=1e-6)
