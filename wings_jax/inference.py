"""Batched generation with a WingsModel: prompts -> padded batch -> prefill -> blocks of extend steps on device.

    engine = Engine(model)
    prompt = encode_chat(model.cfg, tokenizer, [Turn("user", "<image>\\nWhat is it?")], ["cat.jpg"])
    [result] = engine.generate([prompt], max_new_tokens=64, stop_ids=stop_token_ids(tokenizer))

Prompts of different lengths share one right-padded batch; every row continues at its own length
(the cache slot of a token is its position). Shapes are fixed for a whole call: the prompt batch is
padded to a bucketed length and the cache holds that length plus ``max_new_tokens``, so the prefill
compiles once per bucket and the block of decode steps once per cache size.

``recompute=True`` instead runs the full teacher-forced forward on the growing sequence at every step
(also at fixed shapes). It is how ``mixing='reference'`` models decode (their forward is only defined
teacher-forced) and an independent oracle for the cached path.

A :class:`ChatSession` keeps one conversation's cache from one reply to the next, extending it by each new
turn's tokens where that is exact.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Callable, Iterator, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath
from flax import nnx

from wings_jax.checkpoint import CheckpointError, load_model
from wings_jax.data.assemble import Prompt, encode_next_turn, encode_prompt
from wings_jax.data.batch import append_tokens, pad_rows
from wings_jax.data.checks import check_length
from wings_jax.data.constants import DEFAULT_SYSTEM_PROMPT, ENDOFTEXT, IM_END, IMAGE_PLACEHOLDER
from wings_jax.data.conversation import TurnLike
from wings_jax.data.images import ImageSource
from wings_jax.data.tokenizer import load_tokenizer
from wings_jax.model.cache import DecodeCache, grown
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.runtime import Runtime
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.sharding import batch_sharding

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase


class GenerationError(ValueError):
    """A request the model cannot serve (too long, bad sampling settings); the message says what to change."""


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is picked. ``temperature == 0`` is greedy; ``top_k == 0`` / ``top_p == 1`` are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise GenerationError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise GenerationError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerationError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    def values(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The settings as arrays: jitted steps take them as data, so new settings never recompile."""
        return np.float32(self.temperature), np.int32(self.top_k), np.float32(self.top_p)


@dataclasses.dataclass(frozen=True)
class Generation:
    token_ids: list[int]  # the new tokens, without the stop token
    finish_reason: str  # "stop": a stop token came; "length": max_new_tokens were generated


# ---------------------------------------------------------------------------------------------
# prompts and batches


def inference_dtype(dtype: str | None = None) -> str:
    """``dtype``, or when None the default for this backend: bfloat16 on accelerators (their fast path, half
    the bytes per token), float32 on CPU (no bf16 speed-up there; parity with float32 references)."""
    if dtype is not None:
        return dtype
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"


def load_for_inference(path: str, dtype: str | None = None, mesh: jax.sharding.Mesh | None = None
                       ) -> tuple[WingsModel, Any]:
    """The model (parameters stored and computed in ``dtype``, default :func:`inference_dtype`; with a
    ``mesh``, replicated on each of its devices) and tokenizer of a checkpoint or workdir. An :class:`Engine`
    of it holds its own copy of the decoder layers (as separate modules): keep no other reference to the model
    when memory is tight."""
    dtype = inference_dtype(dtype)
    if not epath.Path(path).exists():
        raise CheckpointError(f"checkpoint directory {path!r} does not exist; pass a converted checkpoint "
                              "(python -m wings_jax.convert import-hf ...) or a training workdir")
    replicated = None if mesh is None else jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model, _ = load_model(path, Runtime(dtype=dtype, param_dtype=dtype), shardings_fn=None if mesh is None else (
        lambda params: jax.tree.map(lambda _: replicated, params.to_pure_dict())))
    return model, load_tokenizer(path)


def stop_token_ids(tokenizer: PreTrainedTokenizerBase) -> tuple[int, ...]:
    """Ids of ``<|im_end|>`` (end of an assistant turn) and ``<|endoftext|>`` that the tokenizer knows."""
    vocab = tokenizer.get_vocab()
    return tuple(vocab[t] for t in (IM_END, ENDOFTEXT) if t in vocab)


def with_image_placeholders(text: str, num_images: int) -> str:
    """Puts one ``<image>`` line per image before ``text`` unless the text places them itself (LLaVA style)."""
    if IMAGE_PLACEHOLDER in text:
        return text
    return (IMAGE_PLACEHOLDER + "\n") * num_images + text


def encode_chat(cfg: WingsModelConfig, tokenizer: PreTrainedTokenizerBase, turns: Sequence[TurnLike],
                images: Sequence[ImageSource] = (), *, system_prompt: str = DEFAULT_SYSTEM_PROMPT) -> Prompt:
    """A generation prompt for a model of config ``cfg`` (image size and slots from its tower)."""
    _refuse_images_without_tower(cfg, images)
    return encode_prompt(tokenizer, turns, images, image_size=cfg.image_size,
                         tokens_per_image=cfg.tokens_per_image, system_prompt=system_prompt)


def encode_chat_turn(cfg: WingsModelConfig, tokenizer: PreTrainedTokenizerBase, message: str,
                     images: Sequence[ImageSource] = ()) -> Prompt:
    """What follows a reply in a :class:`ChatSession` when the user sends ``message`` (the reply's closing, the
    user turn, the assistant header: ``data.assemble.encode_next_turn``) for a model of config ``cfg``."""
    _refuse_images_without_tower(cfg, images)
    return encode_next_turn(tokenizer, message, images, image_size=cfg.image_size,
                            tokens_per_image=cfg.tokens_per_image)


def _refuse_images_without_tower(cfg: WingsModelConfig, images: Sequence[ImageSource]) -> None:
    if images and cfg.vision is None:
        raise GenerationError("this model has no vision tower; it cannot take images")


def joined(first: Prompt, then: Prompt) -> Prompt:
    """``first`` followed by ``then``: its tokens at the next positions, its images after ``first``'s."""
    tokens = np.concatenate([first.tokens, then.tokens]).astype(np.int32)
    return Prompt(tokens, np.arange(len(tokens), dtype=np.int32), np.concatenate([first.text_mask, then.text_mask]),
                  np.concatenate([first.images, then.images]), np.concatenate([first.image_mask, then.image_mask]))


def with_continuation(prompt: Prompt, ids: np.ndarray) -> Prompt:
    """``prompt`` followed by the text tokens ``ids`` (an answer to score)."""
    ids = np.asarray(ids, np.int32)
    return joined(prompt, Prompt(ids, np.arange(len(ids), dtype=np.int32), np.ones(len(ids), bool),
                                 prompt.images[:0], prompt.image_mask[:0]))


def bucket_length(n: int, minimum: int = 16) -> int:
    """Smallest of 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them) that holds ``n``.

    Padding to these bounds the number of compiled shapes by a logarithm while wasting at most a third.
    """
    size = minimum
    while True:
        if n <= size:
            return size
        if n <= size * 3 // 2:
            return size * 3 // 2
        size *= 2


def pad_prompts(prompts: Sequence[Prompt], length: int) -> dict[str, np.ndarray]:
    """Right-padded batch (`data.batch`) of unpadded prompts; image keys only if some prompt has images."""
    num_images = max(len(p.images) for p in prompts)
    batch = pad_rows([p._asdict() for p in prompts], length, num_images, image_dtype=np.float32)
    if not num_images:
        del batch["images"], batch["image_mask"]
    return batch


# ---------------------------------------------------------------------------------------------
# sampling


# top-k up to this many is served from jax.lax.top_k candidates instead of a sort of the whole vocabulary
TOP_K_CANDIDATES = 64


def sample_tokens(logits: jax.Array, key: jax.Array, settings: tuple) -> jax.Array:
    """Next tokens (B,) from last-position logits (B, V): greedy, or top-k then top-p, then a draw.

    ``settings`` is ``Sampling.values()`` (traced inside the jitted steps, so every setting shares one
    compilation). Only what the settings need runs: an argmax when greedy, no ordering without top-k or
    top-p, the top ``TOP_K_CANDIDATES`` when top-k is at most that, a full sort otherwise.
    """
    logits = logits.astype(jnp.float32)
    temperature, top_k, top_p = settings

    def draw():
        scaled = logits / jnp.maximum(temperature, 1e-6)
        vocab = scaled.shape[-1]
        candidates = min(TOP_K_CANDIDATES, vocab)

        def cutoff(ordered):
            """The smallest kept logit, from the (B, n) largest ones in descending order."""
            rank = jnp.arange(ordered.shape[-1])[None]
            in_top_k = rank < jnp.where(top_k > 0, jnp.minimum(top_k, vocab), vocab)
            # top-p over what top-k keeps: the most likely tokens until their mass reaches top_p (at least one)
            probs = jax.nn.softmax(jnp.where(in_top_k, ordered, -jnp.inf), axis=-1)
            mass_before = jnp.cumsum(probs, axis=-1) - probs
            keep = in_top_k & ((mass_before < top_p) | (top_p >= 1))
            return jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1, keepdims=True)

        branch = jnp.where((top_k == 0) & (top_p >= 1), 0, jnp.where((top_k > 0) & (top_k <= candidates), 1, 2))
        threshold = jax.lax.switch(branch, [
            lambda: jnp.full((scaled.shape[0], 1), -jnp.inf),
            lambda: cutoff(jax.lax.top_k(scaled, candidates)[0]),
            lambda: cutoff(jnp.sort(scaled, axis=-1)[:, ::-1]),
        ])
        return jax.random.categorical(key, jnp.where(scaled < threshold, -jnp.inf, scaled), axis=-1)

    return jax.lax.cond(temperature > 0, draw, lambda: jnp.argmax(logits, axis=-1)).astype(jnp.int32)


# ---------------------------------------------------------------------------------------------
# jitted steps


def _last(logits: jax.Array, lengths: jax.Array) -> jax.Array:
    """(B, T, V) -> (B, V): each row's logits at its last valid token."""
    return logits[jnp.arange(logits.shape[0]), lengths - 1]


class _Steps(NamedTuple):
    prefill: Callable
    extend_block: Callable
    extend_turn: Callable
    recompute: Callable
    forward: Callable
    option_scores: Callable
    vision: Callable


@functools.lru_cache(maxsize=8)
def _steps(graphdef: nnx.GraphDef) -> _Steps:
    """The jitted functions of one architecture: models that share it (every Engine, every CLI call in a
    process) share the compilations, and no step pays for hashing the graph definition."""

    def prefill(state, batch, lengths, key, settings, max_length):
        logits, cache = nnx.merge(graphdef, state).prefill(batch, max_length, logits_at=lengths - 1)
        return sample_tokens(logits[:, 0], jax.random.fold_in(key, 0), settings), cache

    def extend_block(state, cache, tokens, positions, step, done, key, settings, stop_ids, num_steps, block):
        """Up to ``num_steps`` (<= ``block``) steps on device: each feeds the tokens of step ``step - 1`` at
        ``positions`` and samples step ``step``. Stops early once every row has sampled a stop token
        (``done``); returns the sampled tokens (block, B) of which the first ``count`` rows are real, and
        the carry of the next block, so the host sends nothing between blocks."""
        model = nnx.merge(graphdef, state)

        def body(carry):
            i, out, tokens, cache, positions, step, done = carry
            logits, cache = model.extend(tokens[:, None], positions[:, None], cache)
            tokens = sample_tokens(logits[:, 0], jax.random.fold_in(key, step), settings)
            done = done | jnp.isin(tokens, stop_ids)
            return i + 1, out.at[i].set(tokens), tokens, cache, positions + 1, step + 1, done

        def more(carry):
            i, *_, done = carry
            return (i < num_steps) & ~jnp.all(done)

        out = jnp.zeros((block, tokens.shape[0]), jnp.int32)
        count, out, tokens, cache, positions, step, done = jax.lax.while_loop(
            more, body, (jnp.int32(0), out, tokens, cache, positions, step, done))
        return out, count, tokens, cache, positions, step, done

    def extend_turn(state, cache, tokens, positions, last, key, settings, images=None, image_mask=None):
        """Feeds a turn's tokens (B, T) at ``positions`` (and the images of their ``<image>`` slots, if any);
        samples the first reply token from the ``last``-th."""
        logits, cache = nnx.merge(graphdef, state).extend(tokens, positions, cache, images, image_mask)
        return sample_tokens(logits[:, last], jax.random.fold_in(key, 0), settings), cache

    def recompute(state, batch, lengths, key, step, settings):
        return sample_tokens(_last(nnx.merge(graphdef, state)(batch), lengths), jax.random.fold_in(key, step),
                             settings)

    def forward(state, batch):
        return nnx.merge(graphdef, state)(batch).astype(jnp.float32)

    def option_scores(state, batch, at, targets, valid):
        model = nnx.merge(graphdef, state)
        hidden = jnp.take_along_axis(model.hidden_states(batch), at[..., None], axis=1)
        logits = model.llm.logits(hidden).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
        total = jnp.sum(jnp.where(valid, picked - jax.nn.logsumexp(logits, axis=-1), 0.0), axis=-1)
        greedy = jnp.all(~valid | (jnp.argmax(logits, axis=-1) == targets), axis=-1)
        return total, greedy

    def vision(state, images):
        b, i = images.shape[:2]
        feats = nnx.merge(graphdef, state).vision(images.reshape(b * i, *images.shape[2:]))
        return feats.reshape(b, i, *feats.shape[1:])

    return _Steps(prefill=jax.jit(prefill, static_argnames=("max_length",)),
                  # the old cache is dead after a step: donating it lets XLA update it in place
                  extend_block=jax.jit(extend_block, static_argnames=("block",), donate_argnames=("cache",)),
                  extend_turn=jax.jit(extend_turn, donate_argnames=("cache",)),
                  recompute=jax.jit(recompute), forward=jax.jit(forward), option_scores=jax.jit(option_scores),
                  vision=jax.jit(vision))


# Fills the last batch of continuations up to the fixed batch size: all padding, scores nothing.
_EMPTY_ROW = Prompt(np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, bool), np.zeros((0, 1, 1, 3)),
                    np.zeros(0, bool))


def continuation_batch(rows: Sequence[tuple[Prompt, int]], batch_size: int
                       ) -> tuple[dict[str, np.ndarray], tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """The padded batch (bucketed length, fixed size, tower outputs as ``image_features``) of (prompt, k) rows
    whose last k tokens are scored, and what to score, (B, K) each, K a bucket of the longest continuation: the
    positions whose next token is a continuation token, that token, and which entries are real."""
    prompts = [p for p, _ in rows] + [_EMPTY_ROW] * (batch_size - len(rows))
    batch = pad_prompts(prompts, bucket_length(max(len(p.tokens) for p in prompts)))
    if "images" in batch:
        batch["image_features"] = batch.pop("images")
    width = bucket_length(max(k for _, k in rows), minimum=8)
    at, targets, valid = (np.zeros((batch_size, width), dtype) for dtype in (np.int32, np.int32, bool))
    for i, (prompt, k) in enumerate(rows):
        n = len(prompt.tokens)
        at[i, :k], targets[i, :k], valid[i, :k] = np.arange(n - k - 1, n - 1), prompt.tokens[n - k:], True
    return batch, (at, targets, valid)


# Cached decode steps run on device per dispatch (one jitted while loop): small models are not bound by the
# launches, and a row's stream reaches the host a block at a time.
STEPS_PER_DISPATCH = 16


class Engine:
    """Generation and teacher-forced logits for one model.

    With a ``mesh``, the parameters must already be placed on it (replicated or sharded) and every batch is
    split along its leading axis over the mesh's batch axes, so batch sizes must be multiples of their size.
    """

    def __init__(self, model: WingsModel, mesh: jax.sharding.Mesh | None = None):
        self.cfg = model.cfg
        self.steps_per_dispatch = STEPS_PER_DISPATCH
        # decoder layers as separate modules: each decode step reads every layer's weights and cache in place
        separate = model if isinstance(model.llm.layers, nnx.List) else model.with_separate_layers()
        graphdef, self.state = nnx.split(separate)
        self._steps = _steps(graphdef)
        self._mesh = mesh

    def _place(self, tree: Any) -> Any:
        """Host arrays onto the mesh, split along the batch axis (unchanged without a mesh)."""
        if self._mesh is None:
            return tree
        return jax.tree.map(lambda a: jax.device_put(a, batch_sharding(self._mesh, np.ndim(a))), tree)

    @property
    def must_recompute(self) -> bool:
        return self.cfg.wings.mixing == "reference"

    def logits(self, prompts: Sequence[Prompt]) -> list[np.ndarray]:
        """float32 logits (n, vocab) of each prompt's teacher-forced forward (one padded batch)."""
        lengths = [len(p.tokens) for p in prompts]
        check_length(self.cfg, max(lengths), "the prompt", "shorten it", GenerationError)
        out = np.asarray(self._steps.forward(self.state, self._place(pad_prompts(prompts, bucket_length(max(lengths))))))
        return [row[:n] for row, n in zip(out, lengths)]

    def continuation_scores(self, rows: Sequence[tuple[Prompt, int]], batch_size: int
                            ) -> tuple[np.ndarray, np.ndarray]:
        """For each (prompt, k) row (at most ``batch_size``, padded up to it so shapes repeat): the sum of the
        log-probabilities of the prompt's last k tokens given what precedes them, and whether each of those
        tokens is the most likely one (greedy). Only the hidden states that predict them meet the vocabulary."""
        if not 0 < len(rows) <= batch_size:
            raise ValueError(f"{len(rows)} rows for a batch of {batch_size}")
        for prompt, k in rows:
            if not 0 < k < len(prompt.tokens):
                raise ValueError(f"cannot score {k} of {len(prompt.tokens)} tokens: the first token has no context")
        batch, scored = continuation_batch(rows, batch_size)
        total, greedy = self._steps.option_scores(self.state, *self._place((batch, *scored)))
        return np.asarray(total)[:len(rows)], np.asarray(greedy)[:len(rows)]

    def with_image_features(self, prompt: Prompt) -> Prompt:
        """``prompt`` with its images' tower outputs in place of their pixels (what scoring batches take)."""
        if not len(prompt.image_mask):
            return prompt
        return prompt._replace(images=np.asarray(self.image_features(prompt.images[None]))[0])

    def image_features(self, images: np.ndarray | jax.Array) -> jax.Array:
        """Tower outputs (B, I, T, D_vision) of pixels (B, I, S, S, 3). Batches that carry them as
        ``image_features`` instead of ``images`` skip the tower: compute them once, use them many times."""
        return self._steps.vision(self.state, images)

    def generate(self, prompts: Sequence[Prompt], max_new_tokens: int, sampling: Sampling = Sampling(),
                 stop_ids: Sequence[int] = (), seed: int = 0, recompute: bool | None = None,
                 on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
        """Generates up to ``max_new_tokens`` per prompt; a row stops at its first token in ``stop_ids``.

        ``recompute=None`` picks the cached path unless the model's mixing needs recomputation.
        ``on_token(row, token)`` sees each kept token as soon as it reaches the host (to stream the reply).
        """
        if not prompts:
            raise GenerationError("no prompts to generate from")
        lengths = np.asarray([len(p.tokens) for p in prompts], np.int32)
        if lengths.min() < 1:
            raise GenerationError(f"prompt {int(lengths.argmin())} is empty")
        self._check_room(int(lengths.max()), max_new_tokens)
        if recompute is None:
            recompute = self.must_recompute
        elif not recompute and self.must_recompute:
            raise GenerationError("mixing='reference' models decode only by recomputation (recompute=True)")
        steps = (self._recompute_steps if recompute else self._cached_steps)(
            prompts, lengths, max_new_tokens, sampling.values(), jax.random.key(seed), stop_ids)
        return _collect(steps, len(prompts), set(stop_ids), on_token)

    def _check_room(self, length: int, max_new_tokens: int) -> None:
        """Refuses a request whose prompt of ``length`` tokens leaves no room for ``max_new_tokens``."""
        if max_new_tokens < 1:
            raise GenerationError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        check_length(self.cfg, length + max_new_tokens, "the prompt plus max_new_tokens",
                     "shorten the prompt or ask for fewer new tokens", GenerationError)

    def _cached_steps(self, prompts, lengths, max_new_tokens, settings, key, stop_ids) -> Iterator[np.ndarray]:
        max_length = bucket_length(int(lengths.max())) + max_new_tokens
        tokens, carry = self._prefilled(prompts, lengths, max_length, key, settings)
        return self._decode(tokens, carry, max_new_tokens, settings, key, stop_ids)

    def _prefilled(self, prompts, lengths, max_length, key, settings) -> tuple[jax.Array, "_Carry"]:
        """The first sampled tokens (B,) of the prompts and the carry of a cache of ``max_length`` slots."""
        batch = pad_prompts(prompts, bucket_length(int(lengths.max())))
        tokens, cache = self._steps.prefill(self.state, *self._place((batch, lengths)), key, settings,
                                            max_length=max_length)
        return tokens, _Carry(cache, jnp.asarray(lengths))

    def _extended(self, carry: "_Carry", tokens: np.ndarray, max_length: int, key, settings,
                  images: np.ndarray | None = None) -> jax.Array:
        """Feeds the tokens of one conversation ``tokens`` that the cache lacks (from ``carry.positions`` on) and
        returns the first sampled token (1,); the carry's cache first grows to ``max_length`` slots if smaller.
        ``images`` (I, S, S, 3) fill the ``<image>`` slots among those tokens (``WingsModel.extend``: only with
        ``causal_images``); the cache then grows to hold every image of the conversation if it does not."""
        start = int(carry.positions[0])
        new = tokens[start:]
        image_batch, image_tokens = {}, carry.cache.image_tokens
        if images is not None and len(images):
            # Bucketed image counts bound the compilations: padding images (image_mask False) add no key, and
            # the room holds a bucket of images at least as many as the conversation's
            count, per_image = bucket_length(len(images), minimum=1), self.cfg.tokens_per_image
            pixels = np.zeros((1, count, *images.shape[1:]), np.float32)
            pixels[0, :len(images)] = images
            image_batch = {"images": pixels, "image_mask": np.arange(count)[None] < len(images)}
            needed = int(np.sum(tokens == IMAGE_TOKEN_ID)) // per_image
            image_tokens = max(image_tokens, per_image * bucket_length(needed, minimum=1))
        if carry.cache.max_length < max_length or carry.cache.image_tokens < image_tokens:
            carry.cache = grown(carry.cache, max(max_length, carry.cache.max_length), image_tokens)
        # Bucketed widths bound the compilations; the padding sits past the cache's end, where writes are
        # dropped, so it changes nothing (``extend`` marks every token as real).
        width = bucket_length(len(new))
        ids = np.zeros((1, width), np.int32)
        positions = np.full((1, width), carry.cache.max_length, np.int32)
        ids[0, :len(new)], positions[0, :len(new)] = new, np.arange(start, len(tokens))
        first, carry.cache = self._steps.extend_turn(self.state, carry.cache, ids, positions, np.int32(len(new) - 1),
                                                     key, settings, **image_batch)
        carry.positions = jnp.asarray([len(tokens)], jnp.int32)
        return first

    def _decode(self, tokens, carry: "_Carry", max_new_tokens, settings, key, stop_ids) -> Iterator[np.ndarray]:
        """The sampled tokens of each step after the first (``tokens``), in blocks of cached steps; ``carry``
        follows the last dispatched block. A block dispatched once every row has sampled a stop token runs no
        step, so when the caller stops pulling there, ``carry`` holds every fed token and nothing more."""
        stops = jnp.asarray(sorted(stop_ids) or [-1], jnp.int32)
        # The token sampled at step s - 1 sits at position length + s - 1: feed it, sample step s.
        step, done = jnp.asarray(1, jnp.int32), jnp.isin(tokens, stops)
        pending, remaining = (tokens[None], 1), max_new_tokens - 1
        while remaining > 0:
            # One block in flight: block k is dispatched before the host reads block k - 1's tokens, so the
            # device never idles while the caller looks at them. The step count is data: no recompilation.
            num_steps = min(self.steps_per_dispatch, remaining)
            out, count, tokens, carry.cache, carry.positions, step, done = self._steps.extend_block(
                self.state, carry.cache, tokens, carry.positions, step, done, key, settings, stops,
                np.int32(num_steps), block=self.steps_per_dispatch)
            remaining -= num_steps
            yield from _block_rows(*pending)
            pending = (out, count)
        yield from _block_rows(*pending)

    def _recompute_steps(self, prompts, lengths, max_new_tokens, settings, key, stop_ids) -> Iterator[np.ndarray]:
        # One buffer for the whole call: every step is the same shape (finished rows keep growing too).
        batch = pad_prompts(prompts, bucket_length(int(lengths.max())) + max_new_tokens)
        if "images" in batch and self.cfg.vision is not None:  # the tower runs once, not at every step
            batch["image_features"] = self.image_features(batch.pop("images"))
        lengths = lengths.copy()
        for step in range(max_new_tokens):
            tokens = np.asarray(self._steps.recompute(self.state, *self._place((batch, lengths)), key, step,
                                                      settings))
            yield tokens
            append_tokens(batch, lengths, tokens)
            lengths += 1


class ChatSession:
    """One conversation with an engine's model that keeps its decode cache from one reply to the next.

        session = ChatSession(engine)
        prompt = encode_chat(model.cfg, tokenizer, [Turn("user", "<image>\\nWhat is it?")], ["cat.jpg"])
        first = session.reply(prompt, 64, stop_ids=stop_token_ids(tokenizer))
        second = session.reply(encode_chat_turn(model.cfg, tokenizer, "Why?"), 64, stop_ids=...)

    The conversation is the tokens actually read and generated: each reply's ids, never a re-tokenization of
    its text, then the next turn's. A reply continues from the kept cache where that is exact:

    - a turn that adds no image extends the cache by the tokens it lacks (the previous reply's last token when
      that reply ran out of tokens: a sampled token is fed at the next step; then the turn's tokens) and
      decodes the reply as ``Engine.generate`` does;
    - so does a turn that adds images with ``causal_images`` (the visual learner of a token sees only images that
      start at or before it, so no earlier token's keys and values change): ``WingsModel.extend`` reads the
      images with the turn's tokens, their visual keys going after the cached ones;
    - without ``causal_images`` a turn that adds an image re-reads the whole conversation (one prefill of every
      token and image): the earlier tokens' visual learner sees the new image, so their cached keys and values
      change;
    - ``mixing='reference'`` models decode by recomputation (``Engine.must_recompute``): every turn re-reads.

    The cache grows to bucketed sizes when the conversation outgrows it. ``keep_cache=False`` re-reads every turn:
    what the kept cache must equal token for token. ``rereads`` counts the turns that re-read.
    """

    def __init__(self, engine: Engine, keep_cache: bool = True):
        self.engine, self.keep_cache = engine, keep_cache
        self.prompt: Prompt | None = None  # the conversation up to the latest assistant header
        self.reply_ids: list[int] = []  # the latest reply (without its stop token)
        self.rereads = 0
        self._carry: _Carry | None = None

    def prompt_for(self, turn: Prompt) -> Prompt:
        """The conversation so far followed by ``turn``: what the reply to ``turn`` is generated from."""
        if self.prompt is None:
            return turn
        return joined(with_continuation(self.prompt, np.asarray(self.reply_ids, np.int32)), turn)

    def reply(self, turn: Prompt, max_new_tokens: int, sampling: Sampling = Sampling(), stop_ids: Sequence[int] = (),
              seed: int = 0, on_token: Callable[[int, int], None] | None = None) -> Generation:
        """Generates the reply to ``turn``: the whole first prompt (:func:`encode_chat`), then what follows the
        previous reply (:func:`encode_chat_turn`); arguments as in ``Engine.generate`` (row 0). The conversation
        only grows when that succeeds."""
        if not len(turn.tokens):
            raise GenerationError("the turn is empty: there is nothing to reply to")
        prompt, engine = self.prompt_for(turn), self.engine
        if engine.must_recompute:
            [generation] = engine.generate([prompt], max_new_tokens, sampling, stop_ids, seed, on_token=on_token)
            self.rereads += 1
        else:
            engine._check_room(len(prompt.tokens), max_new_tokens)
            carry, self._carry = self._carry, None  # steps donate the cache: a failed reply leaves none to trust
            key, settings = jax.random.key(seed), sampling.values()
            size = bucket_length(len(prompt.tokens) + max_new_tokens)  # bucketed: few cache shapes to compile
            # without causal_images the earlier tokens' visual learner sees a new image: their cache is stale
            stale = len(turn.images) and not engine.cfg.wings.causal_images
            if carry is None or not self.keep_cache or stale:
                first, carry = engine._prefilled([prompt], np.asarray([len(prompt.tokens)], np.int32), size, key,
                                                 settings)
                self.rereads += 1
            else:
                first = engine._extended(carry, prompt.tokens, size, key, settings, turn.images)
            steps = engine._decode(first, carry, max_new_tokens, settings, key, stop_ids)
            [generation] = _collect(steps, 1, set(stop_ids), on_token)
            self._carry = carry
        self.prompt, self.reply_ids = prompt, generation.token_ids
        return generation


@dataclasses.dataclass
class _Carry:
    """A decode cache between dispatches: every slot before ``positions`` (B,) holds a fed token."""

    cache: DecodeCache
    positions: jax.Array


def _block_rows(out: jax.Array, count: jax.Array) -> Iterator[np.ndarray]:
    """The tokens (B,) of each step a block ran (the first ``count`` of its ``out`` rows)."""
    yield from np.asarray(out)[:int(count)]


def _collect(steps: Iterator[np.ndarray], batch: int, stop_ids: set[int],
             on_token: Callable[[int, int], None] | None = None) -> list[Generation]:
    """Per-row tokens until a stop token or the last step; stops pulling steps when every row is done."""
    out: list[list[int]] = [[] for _ in range(batch)]
    reasons: list[str | None] = [None] * batch
    for tokens in steps:
        for row, token in enumerate(tokens.tolist()):
            if reasons[row] is not None:
                continue
            if token in stop_ids:
                reasons[row] = "stop"
            else:
                out[row].append(token)
                if on_token is not None:
                    on_token(row, token)
        if all(r is not None for r in reasons):
            break
    return [Generation(ids, reason or "length") for ids, reason in zip(out, reasons)]


def detokenize(tokenizer: PreTrainedTokenizerBase, ids: Sequence[int]) -> str:
    return tokenizer.decode(list(ids), skip_special_tokens=True)

