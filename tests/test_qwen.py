"""Qwen2 decoder parity with transformers, scan/remat invariants and converter errors."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from hf_fixtures import make_qwen, right_padded_batch, torch_logits
from wings_jax.convert.hf_io import ConversionError
from wings_jax.convert.qwen_params import load_qwen, qwen_config_from_hf
from wings_jax.model.qwen import positions_from_segments
from wings_jax.model.runtime import Runtime

VOCAB = 160


@pytest.fixture(scope="module", params=["qwen1.5", "qwen2.5", "tied"])
def hf_dir(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = make_qwen(directory, request.param, vocab_size=VOCAB)
    return str(directory), model


def test_logits_match_transformers_float32(hf_dir):
    directory, torch_model = hf_dir
    ids, mask = right_padded_batch([13, 7, 10], total=13, vocab_size=VOCAB)
    expected = torch_logits(torch_model, ids, mask)
    ours = np.asarray(load_qwen(directory)(jnp.asarray(ids), segments=jnp.asarray(mask)))
    valid = mask.astype(bool)
    diff = np.abs(ours - expected)[valid].max()
    assert diff < 1e-4, diff


def test_logits_match_transformers_bfloat16(hf_dir):
    directory, torch_model = hf_dir
    ids, mask = right_padded_batch([12, 5], total=12, vocab_size=VOCAB, seed=1)
    expected = torch_logits(torch_model, ids, mask)
    model = load_qwen(directory, Runtime(dtype="bfloat16"))
    ours = np.asarray(model(jnp.asarray(ids), segments=jnp.asarray(mask)).astype(jnp.float32))
    valid = mask.astype(bool)
    # bfloat16 keeps 8 bits of mantissa: allow 2% of the logits' range.
    tolerance = 0.02 * np.abs(expected[valid]).max()
    assert np.abs(ours - expected)[valid].max() < tolerance
    # and the greedy choice agrees almost everywhere
    agree = (ours.argmax(-1) == expected.argmax(-1))[valid].mean()
    assert agree > 0.9, agree


def test_scan_equals_unrolled_and_chunked_attention(hf_dir):
    directory, _ = hf_dir
    ids, mask = right_padded_batch([16, 9], total=16, vocab_size=VOCAB, seed=2)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    scanned = load_qwen(directory, Runtime(scan_layers=True))(ids, segments=mask)
    unrolled = load_qwen(directory, Runtime(scan_layers=False))(ids, segments=mask)
    # Same arithmetic; XLA fuses the scan body and the unrolled loop differently, so allow float32 rounding.
    np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), rtol=0, atol=1e-6)
    chunked = load_qwen(directory, Runtime(q_chunk=4))(ids, segments=mask)
    dot_product = load_qwen(directory, Runtime(attention="dot_product"))(ids, segments=mask)
    valid = np.asarray(mask, bool)
    np.testing.assert_allclose(np.asarray(chunked)[valid], np.asarray(scanned)[valid], atol=1e-5)
    np.testing.assert_allclose(np.asarray(dot_product)[valid], np.asarray(scanned)[valid], atol=1e-5)


def _grads(model, ids, mask):
    def loss(m):
        logits = m(ids, segments=mask)
        return jnp.sum(jax.nn.log_softmax(logits)[..., 0] * mask)

    return nnx.state(nnx.jit(nnx.grad(loss))(model))


def test_remat_gives_identical_gradients(tmp_path):
    make_qwen(tmp_path, "qwen2.5", vocab_size=VOCAB)
    ids, mask = right_padded_batch([8, 6], total=8, vocab_size=VOCAB, seed=3)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    reference = _grads(load_qwen(str(tmp_path), Runtime(remat="none")), ids, mask)
    for policy in ("full", "attention", "dots", "dots_attention"):
        grads = _grads(load_qwen(str(tmp_path), Runtime(remat=policy)), ids, mask)
        for a, b in zip(jax.tree.leaves(reference), jax.tree.leaves(grads)):
            # Recomputation is the same arithmetic, fused differently: float32 rounding only.
            scale = max(np.abs(np.asarray(a)).max(), 1e-30)
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=0, atol=1e-5 * scale)
    assert any(np.abs(np.asarray(g)).max() > 0 for g in jax.tree.leaves(reference))


def test_rope_tables_are_built_once_per_call(hf_dir):
    """One cos table for every layer's queries and keys (scanned or unrolled), not two per layer."""
    directory, _ = hf_dir
    ids = jnp.ones((2, 8), jnp.int32)

    def cosines(jaxpr):
        return sum((eq.primitive.name == "cos") + sum(cosines(sub) for sub in jax.core.jaxprs_in_params(eq.params))
                   for eq in jaxpr.eqns)

    for scan in (True, False):
        model = load_qwen(directory, Runtime(scan_layers=scan))
        assert model.cfg.num_layers > 1
        assert cosines(jax.make_jaxpr(lambda i: model(i))(ids).jaxpr) == 1


def test_every_parameter_has_logical_axes(tmp_path):
    make_qwen(tmp_path, "qwen1.5", vocab_size=VOCAB)
    state = nnx.state(load_qwen(str(tmp_path)), nnx.Param)
    for path, var in nnx.to_flat_state(state):
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.get_value().ndim, path


def test_positions_from_segments():
    segments = jnp.array([[1, 1, 1, 2, 2, 0, 0], [1, 1, 1, 1, 1, 1, 1]])
    expected = [[0, 1, 2, 0, 1, 0, 0], [0, 1, 2, 3, 4, 5, 6]]
    np.testing.assert_array_equal(np.asarray(positions_from_segments(segments)), expected)


def test_transformers_v4_and_v5_config_styles():
    base = dict(model_type="qwen2", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, num_key_value_heads=1)
    v4 = qwen_config_from_hf({**base, "rope_theta": 12345.0})
    v5 = qwen_config_from_hf({**base, "rope_parameters": {"rope_theta": 12345.0, "rope_type": "default"}})
    assert v4.rope_theta == v5.rope_theta == 12345.0


# ---------------------------------------------------------------------------------------------
# Bad inputs

@pytest.fixture
def good_dir(tmp_path):
    make_qwen(tmp_path / "good", "qwen2.5", vocab_size=VOCAB)
    return tmp_path / "good"


def test_pickled_checkpoint_is_refused(tmp_path, good_dir):
    bad = tmp_path / "bin"
    bad.mkdir()
    shutil.copy(good_dir / "config.json", bad / "config.json")
    (bad / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(ConversionError, match=r"pytorch_model\.bin.*[Pp]ickle.*safetensors"):
        load_qwen(str(bad))


def _rewrite(directory, drop=(), reshape=()):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(directory, "model.safetensors")
    tensors = load_file(path)
    for key in drop:
        del tensors[key]
    for key in reshape:
        tensors[key] = np.zeros((3, 3), tensors[key].dtype)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_and_misshaped_tensors_are_all_listed(good_dir):
    _rewrite(good_dir, drop=["model.layers.1.mlp.up_proj.weight", "model.norm.weight"],
             reshape=["model.layers.0.self_attn.q_proj.weight"])
    with pytest.raises(ConversionError) as err:
        load_qwen(str(good_dir))
    message = str(err.value)
    assert "missing tensors (2)" in message
    assert "model.layers.1.mlp.up_proj.weight" in message and "model.norm.weight" in message
    assert "wrong shape (1)" in message and "model.layers.0.self_attn.q_proj.weight" in message


def test_unexpected_tensor_is_listed(good_dir):
    from safetensors.numpy import load_file, save_file

    path = os.path.join(good_dir, "model.safetensors")
    tensors = load_file(path)
    tensors["model.layers.0.mystery.weight"] = np.zeros(2, np.float32)
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(ConversionError, match=r"unexpected tensors \(1\): model\.layers\.0\.mystery\.weight"):
        load_qwen(str(good_dir))


def test_unknown_model_type_and_unsupported_options(good_dir):
    config_path = good_dir / "config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "model_type": "llama"}))
    with pytest.raises(ConversionError, match=r"config\.json: model_type 'llama' is not supported"):
        load_qwen(str(good_dir))
    config_path.write_text(json.dumps({**config, "use_sliding_window": True}))
    with pytest.raises(ConversionError, match="use_sliding_window"):
        load_qwen(str(good_dir))
    config_path.write_text(json.dumps({**config, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    with pytest.raises(ConversionError, match="rope type 'yarn' is not implemented"):
        load_qwen(str(good_dir))


def test_sharded_safetensors_directory(tmp_path, good_dir):
    from wings_jax.convert.hf_io import SafetensorsReader, write_safetensors

    reader = SafetensorsReader(str(good_dir))
    sharded = tmp_path / "sharded"
    names = write_safetensors(str(sharded), {k: reader[k] for k in reader.keys()}, max_shard_bytes=20_000)
    assert len(names) > 1 and (sharded / "model.safetensors.index.json").exists()
    shutil.copy(good_dir / "config.json", sharded / "config.json")
    ids, mask = right_padded_batch([6, 4], total=6, vocab_size=VOCAB)
    a = load_qwen(str(good_dir))(jnp.asarray(ids), segments=jnp.asarray(mask))
    b = load_qwen(str(sharded))(jnp.asarray(ids), segments=jnp.asarray(mask))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
