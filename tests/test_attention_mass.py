"""attention_mass: per-layer head-summed attention over key groups, checked against explicit probabilities."""
import jax
import jax.numpy as jnp
import numpy as np
import torch
from flax import nnx

from hf_fixtures import make_qwen, right_padded_batch
from wings_fixtures import TINY_LLM, TINY_VISION, jnp_batch, make_batch, tiny_model
from wings_jax.convert.qwen_params import load_qwen
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.layers import rotary_embedding
from wings_jax.model.cache import AttentionInputs
from wings_jax.model.qwen import positions_from_segments

T = (TINY_VISION.image_size // TINY_VISION.patch_size) ** 2


def test_qwen2_mass_equals_transformers_attention_probabilities(tmp_path):
    torch_model = make_qwen(tmp_path, "qwen2.5", vocab_size=160)  # grouped-query attention, 2 layers
    torch_model.set_attn_implementation("eager")
    ids, mask = right_padded_batch([11, 7], total=11, vocab_size=160, seed=5)
    groups = np.random.RandomState(0).uniform(0, 1, (2, 11, 3)).astype(np.float32)
    with torch.no_grad():
        out = torch_model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                          output_attentions=True)
    expected = np.stack([np.einsum("bhqk,bkg->bqg", a.numpy(), groups) for a in out.attentions])
    model = load_qwen(str(tmp_path))
    segments = jnp.asarray(mask)
    inputs = AttentionInputs.build(positions_from_segments(segments), segments, key_groups=jnp.asarray(groups))
    ours = model.attention_mass(model.embed_tokens(jnp.asarray(ids)), inputs)
    assert ours.shape == (2, 2, 11, 3)
    valid = mask.astype(bool)
    np.testing.assert_allclose(np.asarray(ours)[:, valid], expected[:, valid], atol=1e-5)


def _explicit_first_layer_mass(model, batch, groups):
    """Layer 0's probabilities written out: its input is the embedded sequence, whatever the learners do."""
    x = model._inputs(batch, cache=None)[0]
    graphdef, state = nnx.split(model.llm.layers)
    layer = nnx.merge(graphdef, jax.tree.map(lambda a: a[0], state))
    h = layer.input_norm(x)
    theta, pos = TINY_LLM.rope_theta, batch["positions"]
    q = rotary_embedding(layer.attn.q(h), pos, theta)
    k = rotary_embedding(layer.attn.k(h), pos, theta)
    k = jnp.repeat(k, TINY_LLM.num_heads // TINY_LLM.num_kv_heads, axis=2)
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(TINY_LLM.head_dim)
    seg = batch["segment_ids"]
    visible = (seg[:, :, None] == seg[:, None, :]) & (seg[:, None, :] != 0) & (pos[:, None, :] <= pos[:, :, None])
    probs = jax.nn.softmax(jnp.where(visible[:, None], logits, -1e30), axis=-1)
    return jnp.einsum("bhqk,bkg->bqg", probs, groups)


def test_wings_mass_with_images_and_router():
    model = tiny_model(seed=3)  # random learner outputs, router channels active
    rows = [[5, 6, 7, 8, "img", 9, 10, 11], [5, 6, 7, 8, 9, 10, 11, 12, 13]]
    batch = jnp_batch(make_batch(rows, T, TINY_VISION.image_size, 16))
    tokens, seg = np.asarray(batch["tokens"]), np.asarray(batch["segment_ids"])
    is_image = tokens == IMAGE_TOKEN_ID
    before = np.cumsum(is_image, axis=1) == 0
    groups = np.stack([before & ~is_image, is_image, ~before & ~is_image], -1).astype(np.float32)  # every key
    mass = np.asarray(model.attention_mass(batch, jnp.asarray(groups)))
    valid = seg > 0
    np.testing.assert_allclose(mass.sum(-1)[:, valid], TINY_LLM.num_heads, atol=1e-5)
    explicit = np.asarray(_explicit_first_layer_mass(model, batch, jnp.asarray(groups)))
    np.testing.assert_allclose(mass[0][valid], explicit[valid], atol=1e-5)
    assert mass[1, 0, 9, 1] > 0.01  # a post-image token of the image row does look at the image
