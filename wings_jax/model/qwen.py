"""The Qwen2 decoder (Qwen1.5 / Qwen2 / Qwen2.5 shapes) in Flax NNX.

Layers are stacked on a leading 'layers' axis and run with ``lax.scan``. Every layer's attention
reads one :class:`~wings_jax.model.cache.AttentionInputs` built per call. The layers are plain Qwen2
layers (:class:`DecoderLayer`) unless the caller builds others (the Wings model builds
``learners.WingsDecoderLayer``, a subclass) and runs them with its own :data:`LayerCall`.

Entry points: ``embed_tokens``, ``hidden_states`` (hidden states, optionally reading and writing a
:class:`~wings_jax.model.cache.DecodeCache`), ``run_layers``, ``logits`` and ``__call__`` (text-only
forward).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from wings_jax.model import attention as attention_lib
from wings_jax.model.cache import AttentionInputs, CacheView, DecodeCache
from wings_jax.model.layers import RESIDUAL_NAME, Embed, Linear, RMSNorm, Rotary, run_stacked, stacked
from wings_jax.model.runtime import Runtime
from wings_jax.sharding import constrain

@dataclasses.dataclass(frozen=True)
class QwenConfig:
    """Architecture of a Qwen2-family decoder (the fields of a transformers ``Qwen2Config``)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int = 0  # 0: hidden_size // num_heads
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    def __post_init__(self):
        if self.head_dim == 0:
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads {self.num_heads} is not a multiple of num_kv_heads {self.num_kv_heads}")


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.cfg, self.rt = cfg, rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = Linear(h, (n, d), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.k = Linear(h, (k, d), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v = Linear(h, (k, d), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.o = Linear((n, d), h, ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x: jax.Array, inputs: AttentionInputs, cache: CacheView | None,
                 extra_values: jax.Array | None) -> tuple[jax.Array, jax.Array | None]:
        positions = inputs.positions
        q, k = inputs.rope(self.q(x)), inputs.rope(self.k(x))
        v = self.v(x)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        if cache is not None:
            k = cache.write_slots("k", k, inputs.slots)
            v = cache.write_slots("v", v, inputs.slots)
        out, extra = attention_lib.attend(
            q, k, v, q_pos=positions, k_pos=inputs.key_positions, q_seg=inputs.segments, k_seg=inputs.key_segments,
            causal=True, extra_values=extra_values, implementation=self.rt.attention, q_chunk=self.rt.q_chunk,
            heads_first=cache is not None, key_fill=inputs.key_fill,
            rows=self.rt.rows, causal_by_index=cache is None,  # with a cache, queries sit at slots
        )
        return self.o(out), extra


class MLP(nnx.Module):
    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.gate = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.up = Linear(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), **kw)
        self.down = Linear(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), **kw)

    def __call__(self, x):
        hidden = jax.nn.silu(self.gate(x)) * self.up(x)
        return self.down(constrain(hidden, ("act_batch", "act_length", "act_mlp")))


class DecoderLayer(nnx.Module):
    """The Qwen2 layer: pre-norm attention and SwiGLU MLP, each with a residual.

    Its two halves are methods so that a layer with more between them (the Wings layer,
    ``learners.WingsDecoderLayer``) composes them instead of copying them.
    """

    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, rt, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rt, rngs=rngs)

    def __call__(self, x: jax.Array, inputs: AttentionInputs, cache: CacheView | None = None
                 ) -> tuple[jax.Array, jax.Array | None]:
        """The layer's output and, given ``inputs.key_groups``, the head-summed attention mass (B, T, G)
        each query gives each group (else None)."""
        h, _, mass = self.attention_residual(x, inputs, cache)
        return self.mlp_residual(h), mass

    def attention_residual(self, x: jax.Array, inputs: AttentionInputs, cache: CacheView | None,
                           key_values: jax.Array | None = None
                           ) -> tuple[jax.Array, jax.Array | None, jax.Array | None]:
        """``x + attention(norm(x))``, the head-summed attention-weighted ``key_values`` (B, S, C) per query
        (None without them) and the key groups' mass (None without ``inputs.key_groups``)."""
        extra_values = key_values
        routed = 0 if key_values is None else key_values.shape[-1]
        if inputs.key_groups is not None:  # indicator columns ride along as more extra value channels
            groups = inputs.key_groups.astype(jnp.float32)
            extra_values = groups if extra_values is None else jnp.concatenate([extra_values, groups], axis=-1)
        out, extra = self.attn(self.input_norm(x), inputs, cache, extra_values)
        weighted = None if key_values is None else extra[..., :routed]
        mass = None if inputs.key_groups is None else extra[..., routed:]
        return checkpoint_name(x + out, RESIDUAL_NAME), weighted, mass

    def mlp_residual(self, h: jax.Array) -> jax.Array:
        y = h + self.mlp(self.post_norm(h))
        return constrain(y, ("act_batch", "act_length", "act_embed"))


# (layer, hidden states, the call's attention inputs, layer index, the layer's cache view, the layer's slice of
#  run_layers' per_layer) -> (hidden states, per-layer output or None)
LayerCall = Callable[[DecoderLayer, jax.Array, AttentionInputs, jax.Array, CacheView | None, Any],
                     tuple[jax.Array, Any]]


class Qwen2(nnx.Module):
    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs,
                 make_layer: Callable[[nnx.Rngs], DecoderLayer] | None = None):
        """``make_layer`` builds each layer (default: the plain :class:`DecoderLayer`)."""
        self.cfg, self.rt = cfg, rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stacked(make_layer or (lambda r: DecoderLayer(cfg, rt, rngs=r)), cfg.num_layers, rngs)
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, **kw
        )

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return constrain(self.embed(ids), ("act_batch", "act_length", "act_embed"))

    def hidden_states(self, x: jax.Array, inputs: AttentionInputs, cache: DecodeCache | None = None
                      ) -> tuple[jax.Array, DecodeCache | None]:
        """Runs all layers on embeddings ``x`` (B, T, H) described by ``inputs`` (built with ``cache``).

        Without a cache the tokens attend to each other; with one, their keys are written at slot
        = position and they attend to everything the cache holds.
        """
        hidden, new_cache, _ = self.run_layers(x, inputs, cache)
        return hidden, new_cache

    def attention_mass(self, x: jax.Array, inputs: AttentionInputs) -> jax.Array:
        """Head-summed attention mass (layers, B, T, G) that each query of a teacher-forced pass gives to
        each group of keys; ``inputs.key_groups`` (B, T, G) marks the keys of each group (e.g. 0/1 indicators).

        Computed like the router's input, as extra value channels of each layer's attention: the
        probabilities are never materialised. With indicator groups covering every visible key, the
        groups of a query sum to the number of heads.
        """
        return self.run_layers(x, inputs)[2]

    def run_layers(self, x: jax.Array, inputs: AttentionInputs, cache: DecodeCache | None = None,
                   call: LayerCall | None = None, per_layer: Any = None) -> tuple[jax.Array, DecodeCache | None, Any]:
        """Final-norm hidden states, the updated cache and the stacked per-layer outputs of ``call``
        (default: ``layer(h, inputs, cache_view)``, returning the key groups' mass). ``per_layer``: arrays
        with a leading layers axis computed before the scan; ``call`` gets each layer's slice, and ``inputs``
        with their RoPE tables, built here once for every layer."""
        call = call or (lambda layer, h, attn, index, view, _: layer(h, attn, view))
        inputs = inputs.replace(rope=Rotary.at(inputs.positions, self.cfg.rope_theta, self.cfg.head_dim))

        def body(layer, carry, xs):
            (h, buffers), (index, sliced) = carry, xs
            view = None if buffers is None else CacheView(buffers, index)
            h, out = call(layer, h, inputs, index, view, sliced)
            return (h, None if view is None else view.arrays), out

        # The cache rides in the scan carry (updated in place), not in the per-layer outputs.
        carry = (x, None if cache is None else cache.layers)
        # numpy indices: a Python int per layer in an unrolled loop (each indexes its own cache arrays)
        (h, buffers), outs = run_stacked(self.layers, body, carry, (np.arange(self.cfg.num_layers), per_layer),
                                         remat=self.rt.remat, scan=self.rt.scan_layers)
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(layers=buffers, positions=inputs.key_positions, segments=inputs.key_segments)
        return self.final_norm(h), new_cache, outs

    def output_kernel(self) -> jax.Array:
        """The LM head as an (hidden, vocab) matrix in the compute dtype (the embedding, when tied)."""
        kernel = self.embed.embedding[...].T if self.lm_head is None else self.lm_head.kernel[...]
        return kernel.astype(self.rt.dtype)

    def logits(self, hidden: jax.Array) -> jax.Array:
        out = jnp.einsum("...h,hv->...v", hidden.astype(self.rt.dtype), self.output_kernel())
        return constrain(out, ("act_batch", "act_length", "act_vocab"))

    def __call__(self, ids: jax.Array, positions: jax.Array | None = None, segments: jax.Array | None = None) -> jax.Array:
        """Text-only logits (B, T, vocab); ``segments`` 0 marks padding (defaults: all tokens valid)."""
        if segments is None:
            segments = jnp.ones(ids.shape, jnp.int32)
        if positions is None:
            positions = positions_from_segments(segments)
        hidden, _ = self.hidden_states(self.embed_tokens(ids), AttentionInputs.build(positions, segments))
        return self.logits(hidden)

    def init_cache(self, batch: int, max_length: int, extra_layers: dict[str, tuple[tuple[int, ...], Any]] | None = None
                   ) -> DecodeCache:
        """An empty cache; ``extra_layers`` adds per-layer buffers: name -> (shape without layers axis, dtype),
        slots at axis -2 like 'k' and 'v' (B, heads, slots, head_dim), or image tokens there for names 'image_*'."""
        cfg = self.cfg
        kv_shape = (batch, cfg.num_kv_heads, max_length, cfg.head_dim)
        shapes = {"k": (kv_shape, self.rt.dtype), "v": (kv_shape, self.rt.dtype), **(extra_layers or {})}
        if isinstance(self.layers, nnx.List):  # separate layers: an array per layer (see DecodeCache)
            layers = {name: tuple(jnp.zeros(shape, dtype) for _ in range(cfg.num_layers))
                      for name, (shape, dtype) in shapes.items()}
        else:
            layers = {name: jnp.zeros((cfg.num_layers, *shape), dtype) for name, (shape, dtype) in shapes.items()}
        zeros = jnp.zeros((batch, max_length), jnp.int32)
        return DecodeCache(layers=layers, positions=zeros, segments=zeros)


def positions_from_segments(segments: jax.Array) -> jax.Array:
    """0, 1, 2, ... within each run of equal non-zero segment ids; 0 on padding."""
    idx = jnp.arange(segments.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segments != 0, idx - start_idx, 0).astype(jnp.int32)
