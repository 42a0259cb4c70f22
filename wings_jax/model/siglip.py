"""The SigLIP vision tower (the vision half of a transformers ``SiglipVisionModel``) in Flax NNX.

Pixels (..., S, S, C) NHWC -> patch embedding (a stride-``patch`` convolution written as a matmul over
non-overlapping patches) + learned position embeddings -> pre-LayerNorm encoder layers, stacked on a
'layers' axis and run with ``layers.run_stacked`` -> optional ``post_layernorm``. No pooling head.

``SiglipConfig.num_layers`` is the number of encoder layers we *run*. The Wings feature (HF
``hidden_states[-2]``) is the first ``num_hidden_layers - 1`` layers without the post-layernorm; the
converter (``wings_jax.convert.siglip_params``) builds that config from a Hugging Face one.

The tower is used frozen in Wings: call :meth:`SiglipVisionTower.frozen_features`, which wraps the
forward in ``jax.lax.stop_gradient`` so no gradient (and no backward compute) reaches the tower.
Keeping its parameters out of the optimizer is the caller's business (filter them by path).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from wings_jax.model import attention as attention_lib
from wings_jax.model.layers import LayerNorm, Linear, default_kernel_init, gelu_tanh, make_param, run_stacked, stacked
from wings_jax.model.runtime import Runtime
from wings_jax.sharding import constrain

_ACT = ("act_batch", "act_length", "act_embed")


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    """Architecture of a SigLIP vision tower; ``num_layers`` counts the encoder layers that are run."""

    image_size: int
    patch_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    layer_norm_eps: float = 1e-6
    num_channels: int = 3
    use_post_layernorm: bool = False

    def __post_init__(self):
        # image_size need not be a multiple of patch_size: like the stride-p "valid" convolution of HF,
        # the grid is image_size // patch_size and the last image_size % patch_size rows and columns
        # are unused. so400m needs this: 384 = 27 * 14 + 6 gives 27 x 27 = 729 patches.
        if self.patch_size <= 0 or self.image_size <= 0:
            raise ValueError(f"SigLIP image_size={self.image_size} and patch_size={self.patch_size} must be positive")
        if self.image_size < self.patch_size:
            raise ValueError(
                f"SigLIP image_size={self.image_size} is smaller than patch_size={self.patch_size}; "
                "the image would hold no patch"
            )
        if self.hidden_size % self.num_heads:
            raise ValueError(f"SigLIP hidden_size={self.hidden_size} is not a multiple of num_heads={self.num_heads}")
        if self.num_layers < 1:
            raise ValueError(f"SigLIP num_layers={self.num_layers}: at least one encoder layer must run")

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_positions(self) -> int:
        """Tokens per image (= number of position embeddings)."""
        return self.grid ** 2

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


class SiglipAttention(nnx.Module):
    def __init__(self, cfg: SiglipConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.rt = rt
        kw = dict(use_bias=True, dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        d, n, hd = cfg.hidden_size, cfg.num_heads, cfg.head_dim
        self.q = Linear(d, (n, hd), ("vision_embed", "vision_heads", "head_dim"), **kw)
        self.k = Linear(d, (n, hd), ("vision_embed", "vision_heads", "head_dim"), **kw)
        self.v = Linear(d, (n, hd), ("vision_embed", "vision_heads", "head_dim"), **kw)
        self.out = Linear((n, hd), d, ("vision_heads", "head_dim", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        heads = ("act_batch", "act_length", "act_heads", "act_head_dim")
        q, k, v = (constrain(proj(x), heads) for proj in (self.q, self.k, self.v))
        # Every token sees every token of its own image: one segment, no causality.
        seg = jnp.ones(x.shape[:2], jnp.int32)
        pos = jnp.zeros(x.shape[:2], jnp.int32)
        out, _ = attention_lib.attend(
            q, k, v, q_pos=pos, k_pos=pos, q_seg=seg, k_seg=seg, causal=False,
            implementation=self.rt.attention, q_chunk=self.rt.q_chunk, rows="padded",  # every image is whole
        )
        return self.out(out)


class SiglipMLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, rt: Runtime, *, rngs: nnx.Rngs):
        kw = dict(use_bias=True, dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, ("vision_embed", "vision_mlp"), **kw)
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, ("vision_mlp", "vision_embed"), **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = gelu_tanh(self.fc1(x))
        return self.fc2(constrain(hidden, ("act_batch", "act_length", "act_mlp")))


class SiglipEncoderLayer(nnx.Module):
    """Pre-norm: ``x + attn(ln1(x))``, then ``+ mlp(ln2(.))``."""

    def __init__(self, cfg: SiglipConfig, rt: Runtime, *, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, axes=("vision_embed",), rngs=rngs)
        self.norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.attn = SiglipAttention(cfg, rt, rngs=rngs)
        self.norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, **kw)
        self.mlp = SiglipMLP(cfg, rt, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = x + self.attn(self.norm1(x))
        y = h + self.mlp(self.norm2(h))
        return constrain(y, _ACT)


class SiglipVisionTower(nnx.Module):
    """SigLIP vision encoder: pixels (..., S, S, C) -> features (..., T, hidden), T = (S // patch) ** 2.

    S must equal ``cfg.image_size``; when S is not a multiple of the patch size the trailing S % patch
    rows and columns do not contribute, exactly as in Hugging Face.

    Tokens are in row-major patch order (row 0 left to right, then row 1, ...), as in Hugging Face.
    """

    def __init__(self, cfg: SiglipConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.cfg, self.rt = cfg, rt
        p, c, d = cfg.patch_size, cfg.num_channels, cfg.hidden_size
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        # The stride-p convolution over non-overlapping patches is a matmul of each flattened patch with
        # a (kh, kw, in, out) kernel: cheaper to express, and the kernel layout matches the CONV rule.
        self.patch_embed = Linear(
            (p, p, c), d, ("vision_patch", "vision_patch", "vision_patch", "vision_embed"), use_bias=True, **kw
        )
        self.position_embedding = make_param(
            rngs, default_kernel_init, (cfg.num_positions, d), ("vision_positions", "vision_embed"), rt.param_dtype
        )
        self.layers = stacked(lambda r: SiglipEncoderLayer(cfg, rt, rngs=r), cfg.num_layers, rngs)
        # Always present so a checkpoint round-trips; applied only if cfg.use_post_layernorm.
        self.post_layernorm = LayerNorm(d, cfg.layer_norm_eps, axes=("vision_embed",), **kw)

    def patchify(self, pixels: jax.Array) -> jax.Array:
        """(B, S, S, C) -> (B, T, p, p, C), patches in row-major order."""
        cfg = self.cfg
        b, g, p, c = pixels.shape[0], cfg.grid, cfg.patch_size, cfg.num_channels
        # Pixels past the last whole patch are dropped, as HF's "valid" convolution does (384 -> 378 for so400m).
        x = pixels[:, : g * p, : g * p].reshape(b, g, p, g, p, c)
        return jnp.transpose(x, (0, 1, 3, 2, 4, 5)).reshape(b, g * g, p, p, c)

    def embed(self, pixels: jax.Array) -> jax.Array:
        """Patch + position embeddings (B, T, hidden) in the compute dtype."""
        x = self.patch_embed(self.patchify(pixels))
        x = x + self.position_embedding[...].astype(x.dtype)[None]
        return constrain(x, _ACT)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        cfg = self.cfg
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixels.ndim < 4 or tuple(pixels.shape[-3:]) != expected:
            raise ValueError(
                f"SigLIP tower expects pixels of shape (..., {cfg.image_size}, {cfg.image_size}, {cfg.num_channels}) "
                f"(NHWC), got {tuple(pixels.shape)}"
            )
        lead = pixels.shape[:-3]
        x = self.embed(pixels.reshape(-1, *expected))

        def body(layer, h, _):
            return layer(h), None

        x, _ = run_stacked(self.layers, body, x, remat=self.rt.remat, scan=self.rt.scan_layers)
        if cfg.use_post_layernorm:
            x = self.post_layernorm(x)
        return x.reshape(*lead, cfg.num_positions, cfg.hidden_size)

    def frozen_features(self, pixels: jax.Array) -> jax.Array:
        """Features with no gradient path into the tower (how Wings uses it: frozen in every stage)."""
        return jax.lax.stop_gradient(self(pixels))
