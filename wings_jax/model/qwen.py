"""The Qwen2 decoder (Qwen1.5 / Qwen2 / Qwen2.5 shapes) in Flax NNX.

Layers are stacked on a leading 'layers' axis and run with ``lax.scan``. A layer may carry a
*side branch* (the Wings learners and router, ``wings_jax.model.learners``): this module only
knows that the branch adds router value channels to the main attention and a residual update
after it, so the plain language model and the Wings model share every line here.

Entry points: ``embed_tokens``, ``hidden_states`` (hidden states, optionally reading and writing a
:class:`DecodeCache`), ``logits`` and ``__call__`` (text-only forward).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from wings_jax.model import attention as attention_lib
from wings_jax.model.layers import RESIDUAL_NAME, Embed, Linear, RMSNorm, rotary_embedding, run_stacked, stacked
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


@struct.dataclass
class DecodeCache:
    """Keys and values of every layer for incremental decoding; slot s of row b holds position s.

    ``layers`` maps names ('k', 'v', and the side branch's own) to arrays with a leading layers axis.
    ``segments`` is 0 for empty slots. ``side`` holds per-sequence metadata of the side branch.
    """

    layers: dict[str, jax.Array]
    positions: jax.Array  # (B, S)
    segments: jax.Array  # (B, S)
    side: dict[str, jax.Array] = struct.field(default_factory=dict)

    @property
    def max_length(self) -> int:
        return self.positions.shape[1]


def cache_slots(positions: jax.Array, segments: jax.Array, max_length: int) -> jax.Array:
    """Where each token goes in a cache: slot = position; padding tokens go past the end (dropped)."""
    return jnp.where(segments != 0, positions, max_length)


def write_slots(buffer: jax.Array, values: jax.Array, slots: jax.Array) -> jax.Array:
    """buffer (B, S, ...)[b, slots[b, t]] = values (B, T, ...); slots past the end are dropped."""
    rows = jnp.arange(buffer.shape[0])[:, None]
    return buffer.at[rows, slots].set(values.astype(buffer.dtype), mode="drop")


class CacheView:
    """One layer's view of the stacked cache buffers, carried through the layer scan.

    Writes go straight into the stacked (layers, ...) arrays at this layer's index, so a decode step
    writes only its new slots instead of copying every layer's cache.
    """

    def __init__(self, arrays: dict[str, jax.Array], layer: jax.Array):
        self.arrays, self.layer = dict(arrays), layer

    def read(self, name: str) -> jax.Array:
        return self.arrays[name][self.layer]

    def write_slots(self, name: str, values: jax.Array, slots: jax.Array) -> jax.Array:
        """Writes values (B, T, ...) at slots (B, T) of this layer; returns the layer's updated buffer."""
        rows = jnp.arange(values.shape[0])[:, None]
        buffer = self.arrays[name]
        self.arrays[name] = buffer.at[self.layer, rows, slots].set(values.astype(buffer.dtype), mode="drop")
        return self.read(name)

    def write_layer(self, name: str, values: jax.Array) -> None:
        buffer = self.arrays[name]
        self.arrays[name] = buffer.at[self.layer].set(values.astype(buffer.dtype))


class Attention(nnx.Module):
    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.cfg, self.rt = cfg, rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        h, n, k, d = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.q = Linear(h, (n, d), ("embed", "heads", "head_dim"), use_bias=True, **kw)
        self.k = Linear(h, (k, d), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.v = Linear(h, (k, d), ("embed", "kv_heads", "head_dim"), use_bias=True, **kw)
        self.o = Linear((n, d), h, ("heads", "head_dim", "embed"), **kw)

    def __call__(self, x, positions, segments, slots, cache: CacheView | None, key_positions, key_segments,
                 extra_values):
        q = rotary_embedding(self.q(x), positions, self.cfg.rope_theta)
        k = rotary_embedding(self.k(x), positions, self.cfg.rope_theta)
        v = self.v(x)
        q = constrain(q, ("act_batch", "act_length", "act_heads", "act_head_dim"))
        k = constrain(k, ("act_batch", "act_length", "act_kv_heads", "act_head_dim"))
        if cache is not None:
            k = cache.write_slots("k", k, slots)
            v = cache.write_slots("v", v, slots)
        out, extra = attention_lib.attend(
            q, k, v, q_pos=positions, k_pos=key_positions, q_seg=segments, k_seg=key_segments, causal=True,
            extra_values=extra_values, implementation=self.rt.attention, q_chunk=self.rt.q_chunk,
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


SideFactory = Callable[[nnx.Rngs], nnx.Module]


class DecoderLayer(nnx.Module):
    """Pre-norm attention and SwiGLU MLP; an optional side branch acts between the two residuals.

    The side branch implements ``router_values(key_positions) -> (B, Tk, C) | None`` (extra value
    channels of the main attention) and ``__call__(h, router_in, inputs, cache, per_layer) -> h``,
    writing its own buffers through the :class:`CacheView`; it finds cache slots in its ``inputs``.
    """

    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs, side_factory: SideFactory | None = None):
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.attn = Attention(cfg, rt, rngs=rngs)
        self.post_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, **kw)
        self.mlp = MLP(cfg, rt, rngs=rngs)
        self.side = side_factory(rngs) if side_factory is not None else None

    def __call__(self, x, positions, segments, slots, cache, key_positions, key_segments, side_inputs, per_layer,
                 key_groups=None):
        """Returns the layer's output and, given ``key_groups`` (B, Tk, G), the head-summed attention mass
        each query gives each group (B, T, G) (else None)."""
        # Without side inputs the layer is the plain Qwen2 layer (the language model alone).
        use_side = self.side is not None and side_inputs is not None
        extra_values = self.side.router_values(key_positions) if use_side else None
        routed = 0 if extra_values is None else extra_values.shape[-1]
        if key_groups is not None:  # indicator columns ride along as more extra value channels
            groups = key_groups.astype(jnp.float32)
            extra_values = groups if extra_values is None else jnp.concatenate([extra_values, groups], axis=-1)
        out, extra = self.attn(
            self.input_norm(x), positions, segments, slots, cache, key_positions, key_segments, extra_values
        )
        router_in, mass = (None, None) if extra is None else (extra[..., :routed], extra[..., routed:])
        h = checkpoint_name(x + out, RESIDUAL_NAME)
        if use_side:
            h = checkpoint_name(self.side(h, router_in, side_inputs, cache, per_layer), RESIDUAL_NAME)
        y = h + self.mlp(self.post_norm(h))
        return constrain(y, ("act_batch", "act_length", "act_embed")), (None if key_groups is None else mass)


class Qwen2(nnx.Module):
    def __init__(self, cfg: QwenConfig, rt: Runtime, *, rngs: nnx.Rngs, side_factory: SideFactory | None = None):
        self.cfg, self.rt = cfg, rt
        kw = dict(dtype=rt.dtype, param_dtype=rt.param_dtype)
        self.embed = Embed(cfg.vocab_size, cfg.hidden_size, rngs=rngs, **kw)
        self.layers = stacked(
            lambda r: DecoderLayer(cfg, rt, rngs=r, side_factory=side_factory), cfg.num_layers, rngs
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, rngs=rngs, **kw)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(
            cfg.hidden_size, cfg.vocab_size, ("embed", "vocab"), rngs=rngs, **kw
        )

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        return constrain(self.embed(ids), ("act_batch", "act_length", "act_embed"))

    def hidden_states(
        self,
        x: jax.Array,
        positions: jax.Array,
        segments: jax.Array,
        *,
        cache: DecodeCache | None = None,
        side_inputs: Any = None,
        per_layer: Any = None,
    ) -> tuple[jax.Array, DecodeCache | None]:
        """Runs all layers on embeddings ``x`` (B, T, H) at ``positions``/``segments`` (B, T).

        Without a cache the tokens attend to each other; with one, their keys are written at slot
        = position and they attend to everything the cache holds.
        """
        hidden, new_cache, _ = self._run_layers(x, positions, segments, cache, side_inputs, per_layer, None)
        return hidden, new_cache

    def attention_mass(self, x: jax.Array, positions: jax.Array, segments: jax.Array, key_groups: jax.Array, *,
                       side_inputs: Any = None, per_layer: Any = None) -> jax.Array:
        """Head-summed attention mass (layers, B, T, G) that each query of a teacher-forced pass gives to
        each group of keys; ``key_groups`` (B, T, G) marks the keys of each group (e.g. 0/1 indicators).

        Computed like the router's input, as extra value channels of each layer's attention: the
        probabilities are never materialised. With indicator groups covering every visible key, the
        groups of a query sum to the number of heads.
        """
        _, _, mass = self._run_layers(x, positions, segments, None, side_inputs, per_layer, key_groups)
        return mass

    def _run_layers(self, x, positions, segments, cache, side_inputs, per_layer, key_groups):
        if cache is None:
            slots, key_positions, key_segments, buffers = None, positions, segments, None
        else:
            slots = cache_slots(positions, segments, cache.max_length)
            key_positions = write_slots(cache.positions, positions, slots)
            key_segments = write_slots(cache.segments, segments, slots)
            buffers = cache.layers

        def body(layer, carry, xs):
            h, buffers = carry
            index, flags = xs
            view = None if buffers is None else CacheView(buffers, index)
            h, mass = layer(h, positions, segments, slots, view, key_positions, key_segments, side_inputs, flags,
                            key_groups)
            return (h, None if view is None else view.arrays), mass

        # The cache rides in the scan carry (updated in place), not in the per-layer outputs.
        layer_index = jnp.arange(self.cfg.num_layers)
        (h, buffers), mass = run_stacked(
            self.layers, body, (x, buffers), (layer_index, per_layer), remat=self.rt.remat, scan=self.rt.scan_layers
        )
        new_cache = None
        if cache is not None:
            new_cache = cache.replace(layers=buffers, positions=key_positions, segments=key_segments)
        return self.final_norm(h), new_cache, mass

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
        hidden, _ = self.hidden_states(self.embed_tokens(ids), positions, segments)
        return self.logits(hidden)

    def init_cache(self, batch: int, max_length: int, side_layers: dict[str, tuple[tuple[int, ...], Any]] | None = None) -> DecodeCache:
        """An empty cache; ``side_layers`` adds per-layer buffers: name -> (shape without layers axis, dtype)."""
        cfg = self.cfg
        kv_shape = (cfg.num_layers, batch, max_length, cfg.num_kv_heads, cfg.head_dim)
        layers = {"k": jnp.zeros(kv_shape, self.rt.dtype), "v": jnp.zeros(kv_shape, self.rt.dtype)}
        for name, (shape, dtype) in (side_layers or {}).items():
            layers[name] = jnp.zeros((cfg.num_layers, *shape), dtype)
        zeros = jnp.zeros((batch, max_length), jnp.int32)
        return DecodeCache(layers=layers, positions=zeros, segments=zeros)


def positions_from_segments(segments: jax.Array) -> jax.Array:
    """0, 1, 2, ... within each run of equal non-zero segment ids; 0 on padding."""
    idx = jnp.arange(segments.shape[1])[None, :]
    starts = jnp.concatenate([jnp.ones_like(segments[:, :1], bool), segments[:, 1:] != segments[:, :-1]], axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return jnp.where(segments != 0, idx - start_idx, 0).astype(jnp.int32)
