"""What the lm-eval and lmms-eval models share: a checkpoint on this host's devices, scored and decoded in
fixed-size batches of similar lengths.

Requests come in as (prompt, number of scored tokens) rows or as generation prompts; rows are sorted by
length and cut into batches of ``batch_size`` (a multiple of the local device count) padded to bucketed
lengths, so a whole evaluation compiles a handful of shapes. Each host holds a full copy of the parameters.
"""
from __future__ import annotations

import logging
import sys
from typing import Any, Callable, Iterator, Mapping, NamedTuple, Sequence

import jax
import numpy as np

from wings_jax.checkpoint import CheckpointError
from wings_jax.config import ConfigError
from wings_jax.data.assemble import Prompt
from wings_jax.data.checks import position_limit
from wings_jax.data.constants import IM_END, IM_START
from wings_jax.data.errors import DataError
from wings_jax.inference import Engine, GenerationError, Sampling, detokenize, load_for_inference
from wings_jax.sharding import make_mesh

logger = logging.getLogger("wings_jax.harness")

REFERENCE_NOTE = ("mixing='reference' checkpoint: every request is scored as the released code scores it alone "
                  "(batch size 1), whatever --batch_size")


class GenerationSettings(NamedTuple):
    until: tuple[str, ...]  # stop strings
    max_new: int
    sampling: Sampling


def by_length(items: Sequence, length: Callable[[Any], int], batch_size: int) -> Iterator[list[int]]:
    """Indices of ``items``, longest first, in chunks of ``batch_size`` (similar lengths share a bucket)."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


class HarnessModel:
    """A checkpoint (converted or a training workdir's newest step) replicated over this host's devices."""

    def __init__(self, ckpt: str, dtype: str | None = None, batch_size: int | str = 8, max_length: int | None = None,
                 max_gen_toks: int = 256, seed: int = 0) -> None:
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"--batch_size must be a number for the wings_jax model, got {batch_size!r}") from None
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be positive, got {batch_size}")
        if dtype not in (None, "float32", "bfloat16"):
            raise ConfigError(f"model_args dtype must be float32 or bfloat16, got {dtype!r}")
        mesh = make_mesh(devices=jax.local_devices())
        per_step = mesh.devices.size
        self.batch_size = -(-batch_size // per_step) * per_step  # every device gets the same number of rows
        model, self.tokenizer = load_for_inference(ckpt, dtype, mesh)
        self.engine = Engine(model, mesh)
        self.cfg = cfg = model.cfg
        # a scored row holds max_length + 1 tokens
        router_limit = position_limit(cfg)
        limit = cfg.llm.max_position_embeddings if router_limit is None else router_limit - 1
        self.max_length = limit if max_length is None else int(max_length)
        if not 0 < self.max_length <= limit:
            why = ("the LLM's max_position_embeddings" if router_limit is None
                   else "the router's wings.router_max_len - 1")
            raise ConfigError(f"model_args max_length={max_length} does not fit the model: at most {limit} ({why})")
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1:
            raise ConfigError(f"model_args max_gen_toks must be positive, got {max_gen_toks}")
        self.seed = int(seed)
        self.reference = cfg.wings.mixing == "reference"
        if self.reference:
            logger.warning(REFERENCE_NOTE)
        self.ckpt = ckpt

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def info(self) -> dict:
        """What the results should record about the model."""
        return {"model_ckpt": self.ckpt, "mixing": self.cfg.wings.mixing,
                **({"note": REFERENCE_NOTE} if self.reference else {})}

    def text_prompt(self, tokens: Sequence[int]) -> Prompt:
        """A text-only prompt; the textual learner reads what follows a leading ChatML system turn (all of
        raw text)."""
        n = len(tokens)
        text_mask = np.arange(n) >= self._system_end(tokens)
        return Prompt(np.asarray(tokens, np.int32), np.arange(n, dtype=np.int32), text_mask,
                      np.zeros((0, 1, 1, 3), np.float32), np.zeros(0, bool))

    def _system_end(self, tokens: Sequence[int]) -> int:
        vocab = self.tokenizer.get_vocab()
        tokens = list(tokens)
        start, end = vocab.get(IM_START), vocab.get(IM_END)
        if not tokens or tokens[0] != start or end not in tokens:
            return 0
        header = self.tokenizer.decode(tokens[:3])
        return tokens.index(end) + 2 if header.startswith(IM_START + "system") else 0  # past "<|im_end|>\n"

    def score(self, rows: Sequence[tuple[Prompt, int]], progress: Callable[[int], None] = lambda n: None
              ) -> list[tuple[float, bool]]:
        """(log-likelihood of the last k tokens, whether each is the greedy choice) per (prompt, k) row."""
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        for chunk in by_length(rows, lambda r: len(r[0].tokens), self.batch_size):
            totals, greedy = self.engine.continuation_scores([rows[i] for i in chunk], self.batch_size)
            for i, total, g in zip(chunk, totals.tolist(), greedy.tolist()):
                out[i] = (total, g)
            progress(len(chunk))
        return out

    def generation_settings(self, gen_kwargs: Mapping[str, Any]) -> GenerationSettings:
        """lm-eval's generation kwargs (``until``, ``max_gen_toks``, ``do_sample``, ``temperature``, ``top_k``,
        ``top_p``) as stop strings (the end-of-text token's text among them), a token budget and sampling."""
        kwargs = dict(gen_kwargs)
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tokenizer.decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks", None) or kwargs.pop("max_new_tokens", None) or self.max_gen_toks)
        if not 0 < max_new < self.max_length:
            raise GenerationError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                                  f"{self.max_length}; raise model_args max_length or lower max_gen_toks")
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0) or 0.0)
        sampling = Sampling(temperature if do_sample else 0.0, int(kwargs.pop("top_k", 0) or 0),
                            float(kwargs.pop("top_p", 1.0) or 1.0))
        if kwargs:
            logger.warning("generation settings the wings_jax model ignores: %s", sorted(kwargs))
        return GenerationSettings(tuple(until), max_new, sampling)

    def generate(self, prompts: Sequence[Prompt], settings: GenerationSettings) -> list[str]:
        """Continuations of ``prompts``, each cut before its first stop string."""
        out: list[str | None] = [None] * len(prompts)
        for chunk in by_length(prompts, lambda p: len(p.tokens), self.batch_size):
            batch = [prompts[i] for i in chunk]
            filler = [batch[0]] * (self.batch_size - len(batch))  # fixed batch size: no new compilation
            results = self.engine.generate(batch + filler, settings.max_new, settings.sampling,
                                            stop_ids=(self.eot_token_id,), seed=self.seed)
            for i, result in zip(chunk, results):
                text = detokenize(self.tokenizer, result.token_ids)
                for stop in settings.until:
                    text = text.split(stop)[0]
                out[i] = text
        return out


def hand_over(cli: Callable[[], None], prefix: Sequence[str], rest: Sequence[str],
              before: Callable[[], None] = lambda: None) -> int:
    """Runs a harness's own command line ``cli`` (it reads ``sys.argv``) as ``prefix + --model wings_jax + rest``;
    our errors (bad checkpoint, request too long, ...) end it with one line on stderr and status 2."""
    if any(a == "--model" or a.startswith("--model=") for a in rest):
        print("error: --model is always wings_jax here; give the checkpoint as --model_args ckpt=PATH",
              file=sys.stderr)
        return 2
    saved = sys.argv
    try:
        before()
        sys.argv = [*prefix, "--model", "wings_jax", *rest]
        cli()
    except (ConfigError, CheckpointError, DataError, GenerationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


def settings_groups(gen_kwargs: Sequence[Mapping[str, Any]]) -> dict[str, list[int]]:
    """Indices of the requests that share generation settings, so that each batch has one setting."""
    groups: dict[str, list[int]] = {}
    for i, kwargs in enumerate(gen_kwargs):
        groups.setdefault(repr(sorted(kwargs.items())), []).append(i)
    return groups
