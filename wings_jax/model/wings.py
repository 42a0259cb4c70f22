"""WingsModel: SigLIP tower -> projector -> image features at the image slots -> Qwen2 with learners.

Entry points (big_vision style): ``embed_image``, ``embed_text``, ``__call__`` / ``hidden_states``
(teacher-forced forward of a batch, see docs/architecture.md for its keys), ``prefill`` and
``extend`` (incremental decoding with a :class:`~wings_jax.model.cache.DecodeCache`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from wings_jax.model.cache import AttentionInputs, DecodeCache, write_slots
from wings_jax.model.inputs import IMAGE_TOKEN_ID, normalize
from wings_jax.model.layers import unstacked
from wings_jax.model.learners import LearnerInputs, WingsConfig, WingsDecoderLayer
from wings_jax.model.projector import Projector
from wings_jax.model.qwen import Qwen2, QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig, SiglipVisionTower
from wings_jax.sharding import constrain

Batch = Mapping[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class WingsModelConfig:
    llm: QwenConfig
    vision: SiglipConfig | None
    wings: WingsConfig = WingsConfig()
    projector: str = "mlp2x_gelu"

    @property
    def tokens_per_image(self) -> int:
        return 0 if self.vision is None else self.vision.num_positions

    @property
    def image_size(self) -> int:
        """Pixels per side of the tower's input; 0 without a tower."""
        return 0 if self.vision is None else self.vision.image_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "WingsModelConfig":
        return cls(
            llm=QwenConfig(**d["llm"]),
            vision=SiglipConfig(**d["vision"]) if d.get("vision") else None,
            wings=WingsConfig(**(d.get("wings") or {})),
            projector=d.get("projector", "mlp2x_gelu"),
        )


class WingsModel(nnx.Module):
    def __init__(self, cfg: WingsModelConfig, rt: Runtime, *, rngs: nnx.Rngs):
        self.cfg, self.rt = cfg, rt
        llm = cfg.llm
        if cfg.wings.mixing == "reference" and cfg.vision is None:
            raise ValueError("mixing='reference' needs a vision tower (text-only rows attend to a blank image)")
        self.layer_flags = cfg.wings.layer_flags(llm.num_layers)  # static; a jnp array at call time
        if cfg.vision is not None:
            self.vision = SiglipVisionTower(cfg.vision, rt, rngs=rngs)
            self.projector = Projector(cfg.projector, cfg.vision.hidden_size, llm.hidden_size, rt, rngs=rngs)
        else:
            self.vision = self.projector = None
        # wings.enabled=False: plain Qwen2 layers, no learner or router parameters at all
        make_layer = (lambda r: WingsDecoderLayer(llm, cfg.wings, rt, rngs=r)) if cfg.wings.enabled else None
        self.llm = Qwen2(llm, rt, rngs=rngs, make_layer=make_layer)

    # -----------------------------------------------------------------------------------------
    # entry points

    def embed_image(self, images: jax.Array, precomputed: bool = False) -> jax.Array:
        """(B, I, S, S, 3) pixels -> (B, I, T, H) projected features.

        Pixels are uint8 (normalised here, on the device: 4x less to transfer than float32) or float
        already normalised by `wings_jax.model.inputs.normalize`. The tower is frozen in every stage: its
        output is cut from the gradient, so training never differentiates through it.
        ``precomputed=True`` takes tower outputs (B, I, T, D_vision).
        """
        if self.vision is None:
            raise ValueError("this model has no vision tower; it cannot take images")
        if images.dtype == jnp.uint8:
            images = normalize(images)
        return self.projector(images if precomputed else self.vision.frozen_features(images))

    def embed_text(self, tokens: jax.Array) -> jax.Array:
        return self.llm.embed_tokens(jnp.where(tokens == IMAGE_TOKEN_ID, 0, tokens))

    def hidden_states(self, batch: Batch) -> jax.Array:
        """Final-norm hidden states (B, L, H) of a teacher-forced batch."""
        return self._run_layers(*self._inputs(batch, cache=None))[0]

    def attention_mass(self, batch: Batch, key_groups: jax.Array) -> jax.Array:
        """Per layer, the main attention's head-summed mass (layers, B, L, G) that each position of a
        teacher-forced batch gives to each group of keys marked by ``key_groups`` (B, L, G) (e.g. pre-image
        text, image tokens): the paper's attention-shift view, without materialising probabilities."""
        return self._run_layers(*self._inputs(batch, cache=None, key_groups=key_groups))[2]

    def __call__(self, batch: Batch) -> jax.Array:
        """Logits (B, L, vocab) of a teacher-forced batch."""
        return self.llm.logits(self.hidden_states(batch))

    def with_separate_layers(self) -> "WingsModel":
        """This model with its decoder layers as separate modules (:func:`~wings_jax.model.layers.unstacked`),
        how inference runs them: an unrolled loop whose caches are per-layer arrays. Same outputs; the
        parameters are copied (the stacked ones stay with ``self``)."""
        graphdef, state = nnx.split(self)
        model = nnx.merge(graphdef, state)
        model.llm.layers = unstacked(model.llm.layers)
        return model

    def prefill(self, batch: Batch, max_length: int, logits_at: jax.Array | None = None
                ) -> tuple[jax.Array, DecodeCache]:
        """Runs the prompt batch; returns logits and a cache with room for ``max_length`` slots.

        ``logits_at`` (B,) picks one position per row (e.g. its last prompt token): logits (B, 1, V)
        instead of projecting the whole prompt onto the vocabulary.
        """
        self._require_cacheable()
        num_image_tokens = self._num_image_tokens(batch)
        b = batch["tokens"].shape[0]
        llm, d = self.cfg.llm, self.cfg.llm.hidden_size // self.cfg.llm.num_heads
        dtype = self.rt.dtype
        buffers = {}
        if self.cfg.wings.enabled:
            buffers.update(image_k=((b, llm.num_heads, num_image_tokens, d), dtype),
                           image_v=((b, llm.num_heads, num_image_tokens, d), dtype))
        learners = {}
        if self.cfg.wings.uses_router:  # the textual learner (finetune stage only) keeps keys per text slot
            if self.rt.text_cache == "low_rank":  # per layer F A_k | F A_v, the embeddings F once for all layers
                buffers.update(text_low=((b, 1, max_length, 2 * self.cfg.wings.lora_rank), dtype))
                learners.update(text_feats=jnp.zeros((b, max_length, llm.hidden_size), dtype))
            else:
                buffers.update(text_k=((b, llm.num_heads, max_length, d), dtype),
                               text_v=((b, llm.num_heads, max_length, d), dtype))
        cache = self.llm.init_cache(b, max_length, buffers).replace(learners=learners)
        return self._run_cached(batch, cache, logits_at)

    def extend(self, tokens: jax.Array, positions: jax.Array, cache: DecodeCache, images: jax.Array | None = None,
               image_mask: jax.Array | None = None) -> tuple[jax.Array, DecodeCache]:
        """Appends ``tokens`` (B, T) at ``positions`` and returns their logits and the new cache.

        ``images`` (B, I, S, S, 3) with ``image_mask`` (B, I), as in a prefill batch, fill the ``<image>`` slots
        among ``tokens``. Only with ``wings.causal_images`` (or without the Wings branch): otherwise the earlier
        tokens' visual learner would see them, which their cached keys and values do not. Their image-token
        entries go after the cache's filled ones, which needs room there (:func:`~wings_jax.model.cache.grown`'s
        ``image_tokens``); entries past its end are dropped.
        """
        self._require_cacheable()
        batch = {"tokens": tokens, "positions": positions, "segment_ids": jnp.ones_like(tokens),
                 "text_mask": tokens != IMAGE_TOKEN_ID}  # image slots are not the textual learner's keys
        if images is not None:
            if self.cfg.wings.enabled and not self.cfg.wings.causal_images:
                raise ValueError("extend takes images only with wings.causal_images: otherwise the earlier tokens' "
                                 "visual learner sees them too, so re-read (prefill) the whole sequence")
            batch.update(images=images, image_mask=image_mask)
        return self._run_cached(batch, cache)

    # -----------------------------------------------------------------------------------------

    def _require_cacheable(self):
        if self.cfg.wings.mixing == "reference":
            raise NotImplementedError(
                "mixing='reference' reproduces the released code's teacher-forced forward only; "
                "decode such a model by recomputing the whole sequence at each step"
            )

    def _num_image_tokens(self, batch: Batch) -> int:
        images = batch.get("images", batch.get("image_features"))
        if images is None or self.vision is None:
            return 1
        return images.shape[1] * self.cfg.tokens_per_image

    def _run_cached(self, batch: Batch, cache: DecodeCache, logits_at: jax.Array | None = None
                    ) -> tuple[jax.Array, DecodeCache]:
        x, attn, learners = self._inputs(batch, cache)
        hidden, cache, _ = self._run_layers(x, attn, learners, cache)
        if logits_at is not None:
            hidden = jnp.take_along_axis(hidden, logits_at[:, None, None], axis=1)
        if learners is not None:
            kept = {"text_segments": learners.text_key_segments, "image_positions": learners.image_positions,
                    "image_mask_pos": learners.image_mask_pos, "image_segments": learners.image_segments}
            if learners.text_key_feats is not None:
                kept["text_feats"] = learners.text_key_feats
            cache = cache.replace(learners={**cache.learners, **kept})
        return self.llm.logits(hidden), cache

    def _run_layers(self, x: jax.Array, attn: AttentionInputs, learners: LearnerInputs | None,
                    cache: DecodeCache | None = None) -> tuple[jax.Array, DecodeCache | None, jax.Array | None]:
        if learners is None:  # plain Qwen2 layers
            return self.llm.run_layers(x, attn, cache)
        flags = jnp.asarray(self.layer_flags)
        layers = self.llm.layers
        if isinstance(layers, nnx.List):  # separate layers (inference): each projects, stacked for the loop
            projected = jax.tree.map(lambda *a: jnp.stack(a), *(l.side.project_features(learners) for l in layers))
        else:
            projected = layers.side.project_features(learners)
        return self.llm.run_layers(
            x, attn, cache, lambda layer, h, attn, index, view, projected: layer(h, attn, view, learners, projected,
                                                                                  flags[index]),
            per_layer=projected)

    def _images(self, batch: Batch) -> tuple[jax.Array, jax.Array] | None:
        """Projected features (B, I, T, H) and validity (B, I), valid images first; None without images."""
        if self.vision is None:
            return None
        if "image_features" in batch:
            feats = self.embed_image(batch["image_features"], precomputed=True)
        elif "images" in batch:
            feats = self.embed_image(batch["images"])
        else:
            return None
        mask = batch["image_mask"].astype(bool)
        order = jnp.argsort(~mask, axis=1, stable=True)  # the k-th valid image fills the k-th run of slots
        feats = jnp.take_along_axis(feats, order[:, :, None, None], axis=1)
        return feats, jnp.take_along_axis(mask, order, axis=1)

    def _inputs(self, batch: Batch, cache: DecodeCache | None, key_groups: jax.Array | None = None
                ) -> tuple[jax.Array, AttentionInputs, LearnerInputs | None]:
        """The embedded sequence, the call's attention inputs and the learners' inputs (None for a model
        without the Wings branch)."""
        tokens, positions, segments = batch["tokens"], batch["positions"], batch["segment_ids"]
        attn = AttentionInputs.build(positions, segments, cache, key_groups)
        b, t = tokens.shape
        is_image = tokens == IMAGE_TOKEN_ID
        x = self.embed_text(tokens)
        images = self._images(batch)
        if images is not None:
            feats, mask = images
            flat = feats.reshape(b, -1, feats.shape[-1])
            rank = jnp.cumsum(is_image, axis=1) - 1  # which image token fills each slot
            placed = jnp.take_along_axis(flat, jnp.clip(rank, 0, flat.shape[1] - 1)[..., None], axis=1)
            x = jnp.where(is_image[..., None], placed.astype(x.dtype), x)
        x = constrain(x, ("act_batch", "act_length", "act_embed"))
        if not self.cfg.wings.enabled:
            return x, attn, None
        text_mask = batch.get("text_mask", ~is_image & (segments != 0)).astype(bool)

        if self.cfg.wings.mixing == "reference":
            return x, attn, self._reference_learner_inputs(x, batch, images, is_image)

        # image keys: each placed image token, at the position of its slot
        image_slots = None
        if images is not None:
            m = flat.shape[1]
            rows = jnp.arange(b)[:, None]
            target = jnp.where(is_image, rank, m)  # slots that hold no image go out of range: dropped
            image_positions = jnp.zeros((b, m), jnp.int32).at[rows, target].set(positions, mode="drop")
            image_segments = jnp.zeros((b, m), jnp.int32).at[rows, target].set(segments, mode="drop")
            image_segments *= jnp.repeat(mask, self.cfg.tokens_per_image, axis=1)
            per_image = image_positions.reshape(b, -1, self.cfg.tokens_per_image)
            image_mask_pos = jnp.broadcast_to(per_image[:, :, :1], per_image.shape).reshape(b, m)
            image_feats = flat
            if cache is not None and "image_segments" in cache.learners:  # extend: after the cached images
                cached = cache.learners["image_segments"]
                # valid images come first (``_images``), so the filled entries end at the last non-empty one
                filled = jnp.max(jnp.where(cached != 0, jnp.arange(1, cached.shape[1] + 1), 0), axis=1)
                image_slots = filled[:, None] + jnp.arange(m)
                image_positions, image_mask_pos, image_segments = (
                    write_slots(cache.learners[name], new, image_slots) for name, new in
                    (("image_positions", image_positions), ("image_mask_pos", image_mask_pos),
                     ("image_segments", image_segments)))
        elif cache is not None and "image_positions" in cache.learners:
            image_feats = None
            image_positions, image_mask_pos = cache.learners["image_positions"], cache.learners["image_mask_pos"]
            image_segments = cache.learners["image_segments"]
        else:  # no images at all: one key that nobody sees, so the visual learner adds exactly 0
            image_feats = jnp.zeros((b, 1, x.shape[-1]), x.dtype)
            image_positions = image_mask_pos = image_segments = jnp.zeros((b, 1), jnp.int32)

        # The textual learner's keys are the main attention's, minus image slots (text_mask).
        text_segments = attn.keys(jnp.where(text_mask, segments, 0),
                                  None if cache is None else cache.learners.get("text_segments"))
        # a low-rank textual cache (allocated by prefill) holds every slot's embedding: this call's go in
        text_key_feats = None
        if cache is not None and "text_feats" in cache.learners:
            text_key_feats = write_slots(cache.learners["text_feats"], x, attn.slots)
        learners = LearnerInputs(
            image_feats=image_feats, image_positions=image_positions, image_mask_pos=image_mask_pos,
            image_segments=image_segments, image_slots=image_slots, image_query_segments=segments, text_feats=x,
            text_query_mask_pos=positions, text_key_mask_pos=attn.key_positions, text_key_segments=text_segments,
            repeats=jnp.ones((b, 2), jnp.float32), text_key_feats=text_key_feats,
        )
        return x, attn, learners

    def _reference_learner_inputs(self, x, batch: Batch, images, is_image) -> LearnerInputs:
        """The released code's learner inputs (spec section 5), for one image per row, unpacked rows."""
        positions, segments = batch["positions"], batch["segment_ids"]
        b, t = positions.shape
        n_img = self.cfg.tokens_per_image
        valid_len = jnp.sum(segments != 0, axis=1)  # right padding: valid slots are 0..valid_len-1
        slot = jnp.broadcast_to(jnp.arange(t)[None], (b, t))
        has_image = jnp.any(is_image, axis=1)
        first = jnp.argmax(is_image, axis=1)  # first image slot of the row
        # visual keys: the row's first image, or a blank (all-zero pixel) image at positions 0..T-1
        blank = self.embed_image(jnp.zeros((1, 1, self.cfg.vision.image_size, self.cfg.vision.image_size, 3),
                                           x.dtype))[0, 0]
        if images is not None and images[0].shape[1] > 1:
            raise ValueError(f"mixing='reference' handles one image per row, as the released code does; this batch "
                             f"has {images[0].shape[1]} image slots per row (use mixing='corrected', or one image)")
        own = images[0][:, 0] if images is not None else jnp.broadcast_to(blank, (b, *blank.shape))
        image_feats = jnp.where(has_image[:, None, None], own, blank[None])
        offsets = jnp.arange(n_img)[None]
        image_positions = jnp.where(has_image[:, None], first[:, None] + offsets, offsets).astype(jnp.int32)
        # a text-only row shorter than one image sees only its first valid_len blank tokens ...
        image_segments = (has_image[:, None] | (offsets < valid_len[:, None])).astype(jnp.int32)
        # ... and its first visual add is masked out; every other row adds the routed outputs twice
        short_text_only = ~has_image & (valid_len < n_img)
        repeats = jnp.stack([jnp.where(short_text_only, 1.0, 2.0), jnp.full((b,), 2.0)], axis=1)
        # text features: slots [system_prompt_length, image start) + [image end, L), all slots without image
        sys_len = self.cfg.wings.system_prompt_length
        in_text = jnp.where(has_image[:, None], ((slot >= sys_len) & (slot < first[:, None]))
                            | (slot >= first[:, None] + n_img), True) & (slot < valid_len[:, None])
        rank = jnp.cumsum(in_text, axis=1) - 1  # masked by compacted feature index, not by position
        return LearnerInputs(
            image_feats=image_feats.astype(x.dtype),
            image_positions=image_positions, image_mask_pos=jnp.zeros_like(image_positions),
            image_segments=image_segments, image_query_segments=jnp.ones_like(segments),
            text_feats=x, text_query_mask_pos=slot, text_key_mask_pos=rank,
            text_key_segments=jnp.where(in_text, segments, 0), repeats=repeats,
        )
