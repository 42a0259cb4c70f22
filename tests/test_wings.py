"""Properties of the Wings model in its (default) corrected semantics."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from wings_fixtures import TINY_LLM, TINY_VISION, jnp_batch, make_batch, tiny_model
from wings_jax.model.inputs import normalize
from wings_jax.model.qwen import Qwen2
from wings_jax.model.runtime import Runtime
from wings_jax.params import flat_values, materialize

T = (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2
SIZE = TINY_VISION.image_size
ROWS = {
    "text": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16],
    "one_image": [5, 6, 7, 8, "img", 9, 10, 11, 12, 13],
    "two_images": [5, 6, 7, "img", 8, 9, "img", 10, 11, 12],
}


def _batch(rows, max_len=24, seed=0):
    return jnp_batch(make_batch(rows, T, SIZE, max_len, seed=seed))


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=0)


def test_fresh_model_equals_plain_llava_model():
    """B = 0: the learners add exactly nothing, so Wings = LLaVA-style model (same weights)."""
    model = tiny_model(randomize_b=False)
    batch = _batch([ROWS["one_image"], ROWS["text"], ROWS["two_images"]])
    ours = model(batch)
    x, attn, _ = model._inputs(batch, cache=None)  # image features placed at their slots, as LLaVA does
    llm_params = {k[len("llm/"):]: v for k, v in flat_values(nnx.state(model, nnx.Param)).items()
                  if k.startswith("llm/") and "/side/" not in k}
    plain = materialize(lambda rngs: Qwen2(TINY_LLM, Runtime(), rngs=rngs), llm_params)
    hidden, _ = plain.hidden_states(x, attn)
    expected = plain.logits(hidden)
    valid = np.asarray(batch["segment_ids"]) > 0
    assert np.abs(np.asarray(ours) - np.asarray(expected))[valid].max() < 1e-6


def _positions_with_text(items, after):
    """Indices (in expanded slots) of text tokens at slot > after."""
    slots, out = 0, []
    for item in items:
        if item == "img":
            slots += T
            continue
        if slots > after:
            out.append(slots)
        slots += 1
    return out


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(sorted(ROWS)), cut=st.integers(3, 15), seed=st.integers(0, 10_000))
def test_causality(model, kind, cut, seed):
    """Changing any text token after position t never changes logits at positions <= t."""
    items = ROWS[kind]
    batch = make_batch([items], T, SIZE, 24, seed=1)
    length = int(batch["segment_ids"][0].sum())
    cut = min(cut, length - 2)
    changed = {k: v.copy() for k, v in batch.items()}
    rng = np.random.RandomState(seed)
    for slot in _positions_with_text(items, cut):
        changed["tokens"][0, slot] = rng.randint(0, TINY_LLM.vocab_size)
    forward = nnx.jit(lambda m, b: m(b))
    a = np.asarray(forward(model, jnp_batch(batch)))[0, : cut + 1]
    b = np.asarray(forward(model, jnp_batch(changed)))[0, : cut + 1]
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_causal_images_option_hides_later_images():
    model = tiny_model(causal_images=True)
    items = ROWS["two_images"]
    batch = make_batch([items], T, SIZE, 24, seed=2)
    changed = {k: v.copy() for k, v in batch.items()}
    changed["images"][0, 1] = np.random.RandomState(9).uniform(-1, 1, (SIZE, SIZE, 3))
    second_image_start = 3 + T + 2
    a = np.asarray(model(jnp_batch(batch)))[0, :second_image_start]
    b = np.asarray(model(jnp_batch(changed)))[0, :second_image_start]
    np.testing.assert_allclose(a, b, atol=1e-6)
    # with the default (non-causal) visual learner, earlier tokens do see the later image
    default = tiny_model()
    a = np.asarray(default(jnp_batch(batch)))[0, :second_image_start]
    b = np.asarray(default(jnp_batch(changed)))[0, :second_image_start]
    assert np.abs(a - b).max() > 1e-5


def test_batch_independence(model):
    """A sample's logits do not depend on the other samples of its batch or on padding."""
    rows = [ROWS["one_image"], ROWS["text"], ROWS["two_images"]]
    together = np.asarray(model(_batch(rows, max_len=24)))
    for i, items in enumerate(rows):
        for max_len in (24, 32):
            alone = np.asarray(model(_batch([items], max_len=max_len)))
            n = int(np.asarray(_batch([items])["segment_ids"]).sum())
            np.testing.assert_allclose(alone[0, :n], together[i, :n], atol=1e-5)


def test_sample_without_image_gets_no_visual_contribution():
    """No image: the visual learner adds exactly 0 (no NaN), in output and gradients."""
    model = tiny_model(stage="pretrain")  # pretrain: h + visual only, so a zero visual is visible
    batch = _batch([ROWS["text"]])
    plain = tiny_model(stage="pretrain", randomize_b=False)
    np.testing.assert_array_equal(np.asarray(model(batch)), np.asarray(plain(batch)))

    def loss(m):
        return jnp.sum(m(batch))

    grads = nnx.grad(loss)(model)
    for path, value in flat_values(nnx.state(grads, nnx.Param)).items():
        assert np.isfinite(np.asarray(value)).all(), path


def _packed(a, b):
    """Conversations ``a`` and ``b`` packed in one row (segments 1 and 2), and where ``b`` starts and ends."""
    la, lb = len(a) - 1 + T, len(b)
    packed = make_batch([a], T, SIZE, 32, seed=0)
    second = make_batch([b], T, SIZE, 24, seed=0)
    packed["tokens"][0, la:la + lb] = second["tokens"][0, :lb]
    packed["positions"][0, la:la + lb] = np.arange(lb)
    packed["segment_ids"][0, la:la + lb] = 2
    packed["text_mask"][0, la:la + lb] = second["text_mask"][0, :lb]
    return jnp_batch(packed), la, lb


def test_packed_segments_equal_separate_rows(model):
    """Two conversations packed in one row give the logits they give in rows of their own."""
    a, b = ROWS["one_image"], ROWS["text"]
    separate = np.asarray(model(_batch([a, b], max_len=24)))
    packed, la, lb = _packed(a, b)
    out = np.asarray(model(packed))
    np.testing.assert_allclose(out[0, :la], separate[0, :la], atol=1e-5)
    np.testing.assert_allclose(out[0, la:la + lb], separate[1, :lb], atol=1e-5)


def test_learner_layers_subset_skips_other_layers():
    model = tiny_model(learner_layers=(1,))
    batch = _batch([ROWS["one_image"]])
    out = np.asarray(model(batch))
    # zeroing the learners of layer 0 (not a learner layer) changes nothing; layer 1's do
    for layer, should_change in ((0, False), (1, True)):
        clone = nnx.clone(model)
        for learner in (clone.llm.layers.side.visual, clone.llm.layers.side.textual):
            for name in "qkvo":
                param = getattr(learner, f"{name}_b")
                param.set_value(param.get_value().at[layer].set(0.0))
        diff = np.abs(np.asarray(clone(batch)) - out).max()
        assert (diff > 1e-6) == should_change, (layer, diff)


@pytest.mark.parametrize("stage", ["pretrain", "finetune"])
def test_gradients_finite_and_frozen_tower_gets_none(stage):
    model = tiny_model(stage=stage)
    batch = _batch([ROWS["one_image"], ROWS["text"]])

    def loss(m):
        logits = m(batch).astype(jnp.float32)
        return jnp.mean(jax.nn.logsumexp(logits, -1))

    grads = flat_values(nnx.state(nnx.grad(loss)(model), nnx.Param))
    for path, g in grads.items():
        g = np.asarray(g)
        assert np.isfinite(g).all(), path
        if path.startswith("vision/"):
            assert not g.any(), path  # the tower is cut from the graph
    groups = ["projector/", "side/visual/", "llm/layers/attn/"]
    if stage == "finetune":
        groups += ["side/textual/", "side/router/"]
    for group in groups:
        assert any(np.abs(np.asarray(g)).max() > 0 for p, g in grads.items() if group in p), group
    if stage == "pretrain":  # neither the textual learner nor the router takes part
        assert all(not np.asarray(g).any() for p, g in grads.items() if "side/textual/" in p or "side/router/" in p)


def test_precomputed_image_features_match_pixels(model):
    batch = _batch([ROWS["two_images"]])
    b, i = batch["images"].shape[:2]
    features = model.vision(batch["images"].reshape(b * i, SIZE, SIZE, 3)).reshape(b, i, T, -1)
    precomputed = {k: v for k, v in batch.items() if k != "images"}
    precomputed["image_features"] = features
    np.testing.assert_allclose(np.asarray(model(precomputed)), np.asarray(model(batch)), atol=1e-6)


def test_uint8_pixels_are_normalised_on_the_device(model):
    """The pipeline sends uint8 pixels; the model's result equals that of the same pixels normalised on the host."""
    batch = make_batch([ROWS["two_images"]], T, SIZE, 24, seed=5)
    pixels = np.random.default_rng(5).integers(0, 256, batch["images"].shape, dtype=np.uint8)
    as_uint8 = {**batch, "images": pixels}
    as_float = {**batch, "images": normalize(pixels)}
    assert as_float["images"].dtype == np.float32 and as_float["images"].min() < -0.99
    np.testing.assert_allclose(np.asarray(model(jnp_batch(as_uint8))), np.asarray(model(jnp_batch(as_float))),
                               atol=1e-6)


def test_image_order_follows_validity_mask(model):
    """The k-th valid image fills the k-th run of image slots, wherever it sits in the image array."""
    batch = make_batch([ROWS["one_image"]], T, SIZE, 24, seed=3)
    moved = {k: v.copy() for k, v in batch.items()}
    moved["images"][0, 1], moved["images"][0, 0] = batch["images"][0, 0], 0.0
    moved["image_mask"][0] = [False, True]
    np.testing.assert_allclose(np.asarray(model(jnp_batch(moved))), np.asarray(model(jnp_batch(batch))), atol=1e-6)


def test_bfloat16_compute_close_to_float32():
    batch = _batch([ROWS["one_image"], ROWS["text"]])
    f32 = np.asarray(tiny_model()(batch))
    bf16 = np.asarray(tiny_model(runtime=Runtime(dtype="bfloat16"))(batch).astype(jnp.float32))
    valid = np.asarray(batch["segment_ids"]) > 0
    assert np.abs(bf16 - f32)[valid].max() < 0.05 * np.abs(f32[valid]).max()


def test_reference_mode_refuses_several_images_per_row():
    """The released code handles one image per sample; a batch with more image slots is refused by name."""
    model = tiny_model(mixing="reference")
    model(jnp_batch(make_batch([ROWS["one_image"], ROWS["text"]], T, SIZE, 24, max_images=1)))  # one slot: runs
    with pytest.raises(ValueError, match="mixing='reference' handles one image per row.*2 image slots"):
        model(_batch([ROWS["two_images"]]))


def test_layer_invariant_projections_are_one_product_for_all_layers():
    """The learners' A_k / A_v projections of their layer-invariant features (image features, token
    embeddings) for every layer at once equal each layer's own product."""
    side = tiny_model().llm.layers.side
    feats = jax.random.normal(jax.random.key(0), (2, 5, TINY_LLM.hidden_size))
    for learner in (side.visual, side.textual):
        projected = learner.project_features(feats)  # (layers, B, M, 2 rank)
        for layer in range(TINY_LLM.num_layers):
            want = jnp.concatenate([feats @ learner.k_a[...][layer], feats @ learner.v_a[...][layer]], axis=-1)
            np.testing.assert_allclose(np.asarray(projected[layer]), np.asarray(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("stage,learner_layers", [("finetune", None), ("pretrain", None), ("finetune", (1,))])
def test_separate_layers_compute_what_stacked_layers_do(stage, learner_layers):
    """with_separate_layers (how inference runs): the same logits, and the same prefill / extend logits with
    a cache of per-layer arrays in place of stacked ones (to float32 rounding: XLA fuses the two differently)."""
    close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-6, rtol=1e-5)  # noqa: E731
    model = tiny_model(stage, learner_layers=learner_layers)
    separate = model.with_separate_layers()
    assert isinstance(separate.llm.layers, nnx.List) and len(separate.llm.layers) == TINY_LLM.num_layers
    batch = _batch([ROWS["one_image"], ROWS["text"]])
    close(separate(batch), model(batch))
    prompt = {k: v[:, :14] for k, v in batch.items() if k not in ("labels",)} | {
        k: batch[k] for k in ("images", "image_mask")}
    logits, cache = model.prefill(prompt, 20)
    logits_separate, cache_separate = separate.prefill(prompt, 20)
    assert isinstance(cache_separate.layers["k"], tuple) and len(cache_separate.layers["k"]) == TINY_LLM.num_layers
    close(logits_separate, logits)
    for name, stacked_buffer in cache.layers.items():
        close(np.stack(cache_separate.layers[name]), stacked_buffer)
    tokens, positions = jnp.array([[3], [4]]), jnp.array([[14], [14]])
    extended, _ = model.extend(tokens, positions, cache)
    extended_separate, _ = separate.extend(tokens, positions, cache_separate)
    close(extended_separate, extended)


@pytest.mark.parametrize("stage,causal_images", [("finetune", False), ("pretrain", False), ("finetune", True)])
def test_padded_rows_on_the_jax_nn_path_equal_the_xla_path(monkeypatch, stage, causal_images):
    """runtime rows='padded' with attention='dot_product': the main attention, both learners and the tower take
    their masks as structure (no mask array reaches jax.nn.dot_product_attention, except the visual learner's
    causal_images, which is causal by image start), and logits and gradients equal the xla path's."""
    batch = _batch([ROWS["two_images"], ROWS["text"]])  # right padding: unpacked rows
    calls = []
    real = jax.nn.dot_product_attention
    monkeypatch.setattr(jax.nn, "dot_product_attention", lambda *a, **kw: calls.append(kw) or real(*a, **kw))

    def run(runtime):
        model = tiny_model(stage, runtime=runtime, causal_images=causal_images)
        loss = lambda m: jnp.sum(jnp.sin(m(batch)) * (batch["segment_ids"][..., None] != 0))  # noqa: E731
        value, grads = nnx.value_and_grad(loss)(model)
        return value, model(batch), nnx.state(grads, nnx.Param)

    value, logits, grads = run(Runtime(attention="dot_product", rows="padded"))
    masked = [kw for kw in calls if kw.get("mask") is not None]
    assert calls and len(masked) == (2 if causal_images else 0)  # forward of the value, and of the logits
    want_value, want_logits, want_grads = run(Runtime())
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("rows", ["padded", "packed"])
def test_splash_attention_equals_the_xla_path(rows):
    """attention='splash' (the TPU kernel, interpreted on CPU) in the main attention, both learners and the
    tower: logits, loss and gradients equal the xla path's, packed rows included."""
    batch = _batch([ROWS["two_images"], ROWS["text"]]) if rows == "padded" else \
        _packed(ROWS["one_image"], ROWS["text"])[0]

    def run(runtime):
        model = tiny_model("finetune", runtime=runtime)
        loss = lambda m: jnp.sum(jnp.sin(m(batch)) * (batch["segment_ids"][..., None] != 0))  # noqa: E731
        value, grads = nnx.value_and_grad(loss)(model)
        return value, model(batch), nnx.state(grads, nnx.Param)

    value, logits, grads = run(Runtime(attention="splash", rows=rows))
    want_value, want_logits, want_grads = run(Runtime(rows=rows))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(want_logits), atol=2e-5, rtol=1e-5)
    np.testing.assert_allclose(float(value), float(want_value), rtol=1e-5)
    for got, want in zip(jax.tree.leaves(grads), jax.tree.leaves(want_grads)):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4, rtol=1e-3)
