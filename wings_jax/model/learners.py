"""The Wings decoder layer: a Qwen2 layer plus visual and textual LoRRA learners and the router.

Low-Rank Residual Attention (spec section 3), for queries X and features F::

    Q = X + X A_q B_q    K = F + F A_k B_k    V = F + F A_v B_v    (A ~ truncnormal(0.02), B = 0)
    out = softmax(RoPE(Q) RoPE(K)^T / sqrt(d) + mask) V A_o B_o

so a fresh learner adds exactly zero. The router (spec section 2) mixes the two learners per token
from ``sum_heads(P) @ W_r``, which the main attention computes for us as extra value channels
(:meth:`WingsBlock.router_values`), so the (B, heads, L, L) probabilities are never formed.
"""
from __future__ import annotations

import dataclasses
import math
import jax
import jax.numpy as jnp
from flax import nnx, struct
from jax.ad_checkpoint import checkpoint_name

from wings_jax.model import attention as attention_lib
from wings_jax.model.cache import AttentionInputs, CacheView
from wings_jax.model.layers import RESIDUAL_NAME, compute_weight, make_param, rotary_embedding, zeros_init
from wings_jax.model.qwen import DecoderLayer, QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.sharding import constrain

STAGES = ("pretrain", "finetune")
MIXINGS = ("corrected", "reference")


@dataclasses.dataclass(frozen=True)
class WingsConfig:
    enabled: bool = True  # False: no Wings branch at all (no learner or router parameters): a LLaVA-style model
    stage: str = "finetune"  # "pretrain": visual learners only, no router; "finetune": both learners + router
    learner_layers: tuple[int, ...] | None = None  # None: every layer
    lora_rank: int = 64
    router_max_len: int = 4096  # rows of W_r; longest sequence the router can weigh
    mixing: str = "corrected"  # "reference": the released code's behaviour (spec section 5)
    causal_images: bool = False  # visual learner sees only images that start at or before the query
    system_prompt_length: int = 14  # reference mode only: text features start here

    def __post_init__(self):
        if self.stage not in STAGES:
            raise ValueError(f"wings.stage={self.stage!r}; choose one of {STAGES}")
        if self.mixing not in MIXINGS:
            raise ValueError(f"wings.mixing={self.mixing!r}; choose one of {MIXINGS}")
        if self.lora_rank <= 0 or self.router_max_len <= 0:
            raise ValueError("wings.lora_rank and wings.router_max_len must be positive")
        if not self.enabled and self.mixing == "reference":
            raise ValueError("wings.mixing='reference' needs the Wings branch; it cannot go with wings.enabled=False")
        if self.learner_layers is not None:
            object.__setattr__(self, "learner_layers", tuple(int(i) for i in self.learner_layers))

    def layer_flags(self, num_layers: int) -> tuple[bool, ...]:
        if not self.enabled:
            return (False,) * num_layers
        if self.learner_layers is None:
            return (True,) * num_layers
        bad = [i for i in self.learner_layers if not 0 <= i < num_layers]
        if bad:
            raise ValueError(f"wings.learner_layers {bad} outside the model's {num_layers} layers")
        return tuple(i in self.learner_layers for i in range(num_layers))

    @property
    def uses_router(self) -> bool:
        return self.enabled and self.stage == "finetune"


@struct.dataclass
class LearnerInputs:
    """What the learners need besides the hidden states and the call's :class:`AttentionInputs`
    (whose positions/segments describe the queries and whose slots place text keys in a cache).

    Image keys are the projected image tokens (B x M); ``image_feats`` is None when their keys/values
    come from a decode cache. Text keys are the current tokens (their embeddings ``text_feats``), or
    all cache slots when a cache is used (slot = position). A key segment of 0 means "not a key". The
    ``*_mask_pos`` arrays are what causality compares; they differ from RoPE positions only in
    reference mode.
    """

    image_feats: jax.Array | None  # (B, M, H), or this call's (B, N, H) with image_slots
    image_positions: jax.Array  # (B, M) where each image token sits in the sequence (RoPE)
    image_mask_pos: jax.Array  # (B, M) start of each token's image (causal_images)
    image_segments: jax.Array  # (B, M)
    image_query_segments: jax.Array  # (B, T) what the visual learner compares with image_segments
    text_feats: jax.Array  # (B, T, H)
    text_query_mask_pos: jax.Array  # (B, T)
    text_key_mask_pos: jax.Array  # (B, S)
    text_key_segments: jax.Array  # (B, S)
    repeats: jax.Array  # (B, 2) multipliers of the routed (visual, textual) outputs: 1 unless reference mode
    # (B, S, H) the embeddings at every cache slot with a low-rank textual cache (runtime.text_cache), else None
    text_key_feats: jax.Array | None = None
    # (B, N) with a cache and this call's images (extend): the image-token entries of image_feats, after the
    # cached ones; None when image_feats are the whole image-token axis
    image_slots: jax.Array | None = None


class LoRRALearner(nnx.Module):
    def __init__(self, hidden: int, num_heads: int, rank: int, rt: Runtime, *, rngs: nnx.Rngs):
        if hidden % num_heads:
            raise ValueError(f"hidden size {hidden} is not divisible by {num_heads} heads")
        self.num_heads, self.head_dim, self.dtype = num_heads, hidden // num_heads, rt.dtype
        a_init = jax.nn.initializers.truncated_normal(0.02)
        for name in "qkvo":
            setattr(self, f"{name}_a", make_param(rngs, a_init, (hidden, rank), ("embed", "lora_rank"), rt.param_dtype))
            setattr(self, f"{name}_b", make_param(rngs, zeros_init, (rank, hidden), ("lora_rank", "embed"), rt.param_dtype))

    def _weight(self, name: str) -> jax.Array:
        """Parameter ``name`` (e.g. "q_a") in the compute dtype, as its matmul reads it."""
        return compute_weight(getattr(self, name), self.dtype)

    def _low_rank(self, name: str, x: jax.Array) -> jax.Array:
        return (x @ self._weight(f"{name}_a")) @ self._weight(f"{name}_b")

    def _heads(self, x: jax.Array) -> jax.Array:
        return x.reshape(*x.shape[:-1], self.num_heads, self.head_dim)

    def queries(self, x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
        x = x.astype(self.dtype)
        return rotary_embedding(self._heads(x + self._low_rank("q", x)), positions, theta)

    def project_features(self, feats: jax.Array) -> jax.Array:
        """``feats (B, M, H) @ [A_k | A_v]`` for every layer at once, (layers, B, M, 2 rank), on the stacked
        learner (parameters (layers, ...)): the features are the same for every layer, so this is one GEMM
        outside the layer scan instead of two small ones per layer."""
        a = jnp.concatenate([self._weight("k_a"), self._weight("v_a")], axis=-1)
        return jnp.einsum("bmh,...hr->...bmr", feats.astype(self.dtype), a)  # "...": a stacked learner's layers

    def keys_values(self, feats: jax.Array, projected: jax.Array, positions: jax.Array, theta: float
                    ) -> tuple[jax.Array, jax.Array]:
        """Keys and values of features (B, M, H) given this layer's :meth:`project_features` (B, M, 2 rank)."""
        f = feats.astype(self.dtype)
        low_k, low_v = jnp.split(projected.astype(self.dtype), 2, axis=-1)
        k = rotary_embedding(self._heads(f + low_k @ self._weight("k_b")), positions, theta)
        return k, self._heads(f + low_v @ self._weight("v_b"))

    def output(self, attended: jax.Array) -> jax.Array:
        flat = attended.reshape(*attended.shape[:-2], -1)
        return self._low_rank("o", flat)


class Router(nnx.Module):
    """``softmax(silu(sum_heads(P) @ W_r + b_r))`` -> per-token weights of (visual, textual)."""

    def __init__(self, max_len: int, rt: Runtime, *, rngs: nnx.Rngs):
        # nn.Linear's default init in the original: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
        bound = 1.0 / math.sqrt(max_len)
        init = jax.nn.initializers.uniform(2 * bound)
        shifted = lambda key, shape, dtype: init(key, shape, dtype) - bound  # noqa: E731
        self.weight = make_param(rngs, shifted, (max_len, 2), ("router_len", "router_out"), rt.param_dtype)
        self.bias = make_param(rngs, shifted, (2,), ("router_out",), rt.param_dtype)

    def rows(self, key_positions: jax.Array) -> jax.Array:
        return jnp.take(self.weight[...].astype(jnp.float32), key_positions, axis=0, mode="clip")

    def __call__(self, head_summed: jax.Array) -> jax.Array:
        return jax.nn.softmax(jax.nn.silu(head_summed + self.bias[...].astype(jnp.float32)), axis=-1)


class WingsBlock(nnx.Module):
    """The Wings branch of a layer: ``h + mix(visual(h), textual(h))`` (see :class:`WingsDecoderLayer`)."""

    def __init__(self, llm: QwenConfig, cfg: WingsConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.cfg, self.rt, self.theta = cfg, rt, llm.rope_theta
        self.all_layers = cfg.learner_layers is None
        make = lambda: LoRRALearner(llm.hidden_size, llm.num_heads, cfg.lora_rank, rt, rngs=rngs)  # noqa: E731
        self.visual = make()
        self.textual = make()
        self.router = Router(cfg.router_max_len, rt, rngs=rngs)

    def router_values(self, key_positions: jax.Array) -> jax.Array | None:
        return self.router.rows(key_positions) if self.cfg.uses_router else None

    def project_features(self, inputs: LearnerInputs) -> dict[str, jax.Array]:
        """The learners' layer-invariant projections for every layer (on the stacked branch, before the
        layer scan): 'visual' of the image features (absent when they are cached), 'textual' of the token
        embeddings (finetune stage)."""
        projected = {}
        if inputs.image_feats is not None:
            projected["visual"] = self.visual.project_features(inputs.image_feats)
        if self.cfg.uses_router:
            projected["textual"] = self.textual.project_features(inputs.text_feats)
        return projected

    def __call__(self, h, router_in, attn: AttentionInputs, inputs: LearnerInputs, projected: dict[str, jax.Array],
                 cache: CacheView | None, learner_on):
        """``projected``: this layer's slice of :meth:`project_features`."""
        if self.all_layers:
            return self._apply(h, router_in, attn, inputs, projected, cache)
        # Layers outside learner_layers skip the learners at run time (one scanned body for all layers).
        if cache is None:
            return jax.lax.cond(learner_on, lambda: self._apply(h, router_in, attn, inputs, projected, None),
                                lambda: h)

        def on(arrays):
            view = CacheView(arrays, cache.layer)
            return self._apply(h, router_in, attn, inputs, projected, view), view.arrays

        h, cache.arrays = jax.lax.cond(learner_on, on, lambda arrays: (h, arrays), cache.arrays)
        return h

    def _apply(self, h, router_in, attn: AttentionInputs, inputs: LearnerInputs, projected, cache: CacheView | None):
        visual = self._visual(h, attn, inputs, projected, cache)
        if not self.cfg.uses_router:
            return h + visual
        textual = self._textual(h, attn, inputs, projected, cache)
        weights = self.router(router_in) * inputs.repeats[:, None, :]  # (B, T, 2), float32
        mixed = weights[..., :1].astype(h.dtype) * visual + weights[..., 1:].astype(h.dtype) * textual
        return h + mixed

    def _visual(self, h, attn: AttentionInputs, inputs: LearnerInputs, projected, cache: CacheView | None):
        if inputs.image_feats is None:  # decoding: the image keys/values were cached at prefill, (B, heads, M, D)
            k, v = cache.read("image_k"), cache.read("image_v")
        else:
            positions = inputs.image_positions if inputs.image_slots is None else jnp.take_along_axis(
                inputs.image_positions, inputs.image_slots, axis=1, mode="clip")
            k, v = self.visual.keys_values(inputs.image_feats, projected["visual"], positions, self.theta)
            if inputs.image_slots is not None:  # extend with images: theirs go after the cached ones, read with them
                k, v = (cache.write_slots("image_k", k, inputs.image_slots),
                        cache.write_slots("image_v", v, inputs.image_slots))
            elif cache is not None:
                cache.write_layer("image_k", k)
                cache.write_layer("image_v", v)
        # k, v: the cache's (B, heads, M, D) buffers, or this call's (B, M, heads, D) keys and values
        heads_first = inputs.image_feats is None or inputs.image_slots is not None
        q = self.visual.queries(h, attn.positions, self.theta)
        out, _ = attention_lib.attend(
            q, k, v, q_pos=attn.positions, k_pos=inputs.image_mask_pos, q_seg=inputs.image_query_segments,
            k_seg=inputs.image_segments, causal=self.cfg.causal_images, implementation=self.rt.attention,
            q_chunk=self.rt.q_chunk, heads_first=heads_first,
            rows=self.rt.rows, causal_by_index=False,  # causal_images: by image start
        )
        return constrain(self.visual.output(out), ("act_batch", "act_length", "act_embed"))

    def _textual(self, h, attn: AttentionInputs, inputs: LearnerInputs, projected, cache: CacheView | None):
        q = self.textual.queries(h, attn.positions, self.theta)
        kw = dict(q_pos=inputs.text_query_mask_pos, q_seg=attn.segments, causal=True,
                  implementation=self.rt.attention, q_chunk=self.rt.q_chunk, rows=self.rt.rows,
                  # not with a cache (queries at slots) nor in reference mode (causal by rank)
                  causal_by_index=cache is None and self.cfg.mixing == "corrected")
        if inputs.text_key_feats is not None:
            # Low-rank cache: this layer keeps only F A_k | F A_v per slot (B, 1, S, 2 rank); keys and values
            # are rebuilt from them and the cached embeddings over the filled slots (text keys sit at the main
            # cache's slots, so its key_fill bounds them).
            low = cache.write_slots("text_low", projected["textual"][:, :, None], attn.slots)[:, 0]

            def over(feats, low, positions, mask_pos, segments):
                k, v = self.textual.keys_values(feats, low, positions, self.theta)
                return attention_lib.attend(q, k, v, k_pos=mask_pos, k_seg=segments, **kw)

            out, _ = attention_lib.on_filled_prefix(
                over, attn.key_fill, (inputs.text_key_feats, low, attn.key_positions, inputs.text_key_mask_pos,
                                      inputs.text_key_segments), (1,) * 5)
        else:
            k, v = self.textual.keys_values(inputs.text_feats, projected["textual"], attn.positions, self.theta)
            if cache is not None:
                k = cache.write_slots("text_k", k, attn.slots)
                v = cache.write_slots("text_v", v, attn.slots)
            out, _ = attention_lib.attend(q, k, v, k_pos=inputs.text_key_mask_pos, k_seg=inputs.text_key_segments,
                                          heads_first=cache is not None, key_fill=attn.key_fill, **kw)
        return constrain(self.textual.output(out), ("act_batch", "act_length", "act_embed"))


class WingsDecoderLayer(DecoderLayer):
    """A Qwen2 layer with the Wings branch between its two residuals (spec section 2):
    ``h = x + attn(x)`` (whose extra value channels give the router its input), ``h = h + mix(visual(h),
    textual(h))``, then the MLP residual. Its parameters are the Qwen2 layer's plus ``side``."""

    def __init__(self, llm: QwenConfig, cfg: WingsConfig, rt: Runtime, *, rngs: nnx.Rngs):
        super().__init__(llm, rt, rngs=rngs)
        self.side = WingsBlock(llm, cfg, rt, rngs=rngs)

    def __call__(self, x: jax.Array, inputs: AttentionInputs, cache: CacheView | None = None,
                 learners: LearnerInputs | None = None, projected: dict[str, jax.Array] | None = None,
                 learner_on: jax.Array | bool = True) -> tuple[jax.Array, jax.Array | None]:
        """As :meth:`DecoderLayer.__call__`; ``projected`` is this layer's slice of
        :meth:`WingsBlock.project_features`; ``learner_on`` False skips the branch (a layer outside
        ``learner_layers``). Without ``learners`` it is the plain Qwen2 layer: the language model
        alone (``WingsModel.llm(ids)``, e.g. to compare with its HF export)."""
        if learners is None:
            return super().__call__(x, inputs, cache)
        h, router_in, mass = self.attention_residual(x, inputs, cache, self.side.router_values(inputs.key_positions))
        h = checkpoint_name(self.side(h, router_in, inputs, learners, projected, cache, learner_on), RESIDUAL_NAME)
        return self.mlp_residual(h), mass
