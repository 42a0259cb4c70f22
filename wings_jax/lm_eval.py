"""A wings_jax checkpoint as a model of EleutherAI's lm-evaluation-harness.

    python -m wings_jax.lm_eval --model_args ckpt=CKPT[,dtype=bfloat16,max_length=2048,max_gen_toks=256] \\
        --tasks mmlu,arc_easy --batch_size 16 [every other lm_eval flag: --include_path, --limit, --num_fewshot,
        --output_path, --log_samples, --apply_chat_template, ...]
        [--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed]

registers the model ``wings_jax`` with lm-eval and hands the command line over to lm-eval's own ``run``.
``CKPT`` is a converted checkpoint or a training workdir (its newest step). Requests are raw text as lm-eval
sends them (ChatML only with ``--apply_chat_template``); a text-only row is the base LLM plus its routed
textual learner. ``loglikelihood`` and ``loglikelihood_rolling`` run the jitted teacher-forced scorer
(:meth:`wings_jax.decoding.Decoder.continuation_scores`), ``generate_until`` greedy or sampled KV-cache decoding;
requests are sorted by length and run in batches of ``--batch_size`` rows padded to bucketed lengths, so few
shapes ever compile, each batch split over this host's devices.

Several hosts (a pod slice): start the same command on every host with ``--distributed`` (or the explicit
coordinator flags). Each host is one lm-eval rank: it scores its share of the requests on its own devices with
a full copy of the parameters, and rank 0 gathers the samples and writes the results.

Checkpoints imported with ``mixing="reference"`` decode by recomputation; the released code's results depend on
batch composition, and these are scored as it scores every request alone (batch size 1): each padded row is
independent of the others.
"""
from __future__ import annotations

import argparse
import logging
import pickle
import sys
from typing import Any, Iterator, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from wings_jax.config import ConfigError
from wings_jax.convert.hf_io import ConversionError
from wings_jax.data.assemble import Prompt
from wings_jax.data.constants import IM_END, IM_START
from wings_jax.data.errors import DataError
from wings_jax.decoding import Decoder, GenerationError, Sampling, decode_text, load_for_inference
from wings_jax.sharding import make_mesh

logger = logging.getLogger("wings_jax.lm_eval")

REFERENCE_NOTE = ("mixing='reference' checkpoint: every request is scored as the released code scores it alone "
                  "(batch size 1), whatever --batch_size")


def text_prompt(tokens: Sequence[int], text_from: int = 0) -> Prompt:
    """A text-only prompt; the textual learner reads the tokens from ``text_from`` on (after a system turn)."""
    n = len(tokens)
    text_mask = np.arange(n) >= text_from
    return Prompt(np.asarray(tokens, np.int32), np.arange(n, dtype=np.int32), text_mask,
                  np.zeros((0, 1, 1, 3), np.float32), np.zeros(0, bool))


def _by_length(items: Sequence, length, batch_size: int) -> Iterator[list[int]]:
    """Indices of ``items``, longest first, in chunks of ``batch_size`` (similar lengths share a bucket)."""
    order = sorted(range(len(items)), key=lambda i: -length(items[i]))
    for start in range(0, len(order), batch_size):
        yield order[start:start + batch_size]


@register_model("wings_jax")
class WingsLM(TemplateLM):
    """lm-eval's ``LM`` over a wings_jax checkpoint (see the module docstring)."""

    def __init__(self, ckpt: str, dtype: str = "float32", max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size: int | str = 8, max_batch_size: int | None = None, device: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        del max_batch_size, device  # lm-eval always passes them; JAX places the work on this host's devices
        try:
            batch_size = int(batch_size)
        except ValueError:
            raise ConfigError(f"--batch_size must be a number for the wings_jax model, got {batch_size!r}") from None
        if batch_size < 1:
            raise ConfigError(f"--batch_size must be positive, got {batch_size}")
        if dtype not in ("float32", "bfloat16"):
            raise ConfigError(f"model_args dtype must be float32 or bfloat16, got {dtype!r}")
        self._mesh = make_mesh(devices=jax.local_devices())
        per_step = self._mesh.devices.size
        self.batch_size = -(-batch_size // per_step) * per_step  # every device gets the same number of rows
        model, self.tokenizer = load_for_inference(ckpt, dtype, self._mesh)
        self._decoder = Decoder(model, self._mesh)
        cfg = model.cfg
        # the router weighs at most router_max_len positions; a scored row holds max_length + 1 tokens
        limit = cfg.wings.router_max_len - 1 if cfg.wings.uses_router else cfg.llm.max_position_embeddings
        self.max_length = limit if max_length is None else int(max_length)
        if not 0 < self.max_length <= limit:
            raise ConfigError(f"model_args max_length={max_length} does not fit the model: at most {limit} "
                              "(the router's wings.router_max_len - 1)")
        self.max_gen_toks = int(max_gen_toks)
        if self.max_gen_toks < 1:
            raise ConfigError(f"model_args max_gen_toks must be positive, got {max_gen_toks}")
        self.seed = int(seed)
        self.reference = cfg.wings.mixing == "reference"
        if self.reference:
            logger.warning(REFERENCE_NOTE)
        self._rank, self._world_size = jax.process_index(), jax.process_count()
        self._ckpt = ckpt

    # --- tokens ---------------------------------------------------------------------------------

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def _system_end(self, tokens: Sequence[int]) -> int:
        """Where the text after a leading ChatML system turn starts (0 without one): the learner's text."""
        vocab = self.tokenizer.get_vocab()
        start, end = vocab.get(IM_START), vocab.get(IM_END)
        if not tokens or tokens[0] != start or end not in tokens:
            return 0
        header = self.tokenizer.decode(list(tokens[:3]))
        return tokens.index(end) + 2 if header.startswith(IM_START + "system") else 0

    def get_model_info(self) -> dict:
        return {"model_ckpt": self._ckpt, "mixing": self._decoder.cfg.wings.mixing,
                **({"note": REFERENCE_NOTE} if self.reference else {})}

    # --- scoring --------------------------------------------------------------------------------

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1):]  # as lm-eval's hf model truncates
            rows.append((text_prompt(tokens, self._system_end(tokens)), min(len(continuation), len(tokens) - 1)))
        out: list[tuple[float, bool] | None] = [None] * len(rows)
        with tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or self.rank != 0) as bar:
            for chunk in _by_length(rows, lambda r: len(r[0].tokens), self.batch_size):
                totals, greedy = self._decoder.continuation_scores([rows[i] for i in chunk], self.batch_size)
                for i, total, g in zip(chunk, totals.tolist(), greedy.tolist()):
                    out[i] = (total, g)
                    if requests[i][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[i][0], out[i])
                bar.update(len(chunk))
        return out

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owners = [], []
        for index, (string,) in enumerate(req.args for req in requests):
            for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                    token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, context, continuation))
                owners.append(index)
        totals = np.zeros(len(requests))
        np.add.at(totals, owners, [s for s, _ in self._loglikelihood_tokens(windows, disable_tqdm)])
        for req, total in zip(requests, totals.tolist()):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals.tolist()

    # --- generation -----------------------------------------------------------------------------

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[str, list[int]] = {}
        for i, req in enumerate(requests):  # one sampling setting per batch
            groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0) as bar:
            for members in groups.values():
                self._generate_group([requests[i] for i in members], members, out)
                bar.update(len(members))
        return out

    def _generate_group(self, requests, indices: list[int], out: list) -> None:
        kwargs = dict(requests[0].args[1])
        until = kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        until.append(self.tokenizer.decode([self.eot_token_id]))
        max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
        do_sample = bool(kwargs.pop("do_sample", False))
        temperature = float(kwargs.pop("temperature", 0.0))
        sampling = Sampling(temperature if do_sample else 0.0, int(kwargs.pop("top_k", 0) or 0),
                            float(kwargs.pop("top_p", 1.0) or 1.0))
        if not 0 < max_new < self.max_length:
            raise GenerationError(f"max_gen_toks={max_new} leaves no room for a context within max_length="
                                  f"{self.max_length}; raise model_args max_length or lower max_gen_toks")
        if kwargs:
            logger.warning("generation settings the wings_jax model ignores: %s", sorted(kwargs))
        prompts = []
        for req in requests:
            tokens = self.tok_encode(req.args[0])[-(self.max_length - max_new):]  # lm-eval's hf model cuts so
            prompts.append(text_prompt(tokens, self._system_end(tokens)))
        for chunk in _by_length(prompts, lambda p: len(p.tokens), self.batch_size):
            batch = [prompts[i] for i in chunk]
            filler = [batch[0]] * (self.batch_size - len(batch))  # fixed batch size: no new compilation
            results = self._decoder.generate(batch + filler, max_new, sampling, stop_ids=(self.eot_token_id,),
                                             seed=self.seed)
            for i, result in zip(chunk, results):
                text = decode_text(self.tokenizer, result.token_ids)
                for stop in until:
                    text = text.split(stop)[0]
                out[indices[i]] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)

    # --- several hosts: each is one lm-eval rank ------------------------------------------------

    def all_gather(self, tensor):
        import torch
        return torch.as_tensor(multihost_utils.process_allgather(np.asarray(tensor.cpu()))).reshape(-1)

    def gather_object(self, obj, dst: int = 0):
        data = np.frombuffer(pickle.dumps(obj), np.uint8)
        sizes = np.ravel(multihost_utils.process_allgather(np.int64(len(data))))
        everything = multihost_utils.process_allgather(np.pad(data, (0, int(sizes.max()) - len(data))))
        if self.rank != dst:
            return None
        return [pickle.loads(row[:n].tobytes()) for row, n in zip(everything, sizes)]

    def barrier(self) -> None:
        multihost_utils.sync_global_devices("wings_jax.lm_eval")


def _distributed_flags() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)  # --help goes on to lm-eval's own
    p.add_argument("--distributed", action="store_true")
    p.add_argument("--coordinator_address")
    p.add_argument("--num_processes", type=int)
    p.add_argument("--process_id", type=int)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    from wings_jax.train import _initialize_distributed

    ours, rest = _distributed_flags().parse_known_args(sys.argv[1:] if argv is None else list(argv))
    if any(a == "--model" or a.startswith("--model=") for a in rest):
        print("error: --model is always wings_jax here; give the checkpoint as --model_args ckpt=PATH",
              file=sys.stderr)
        return 2
    saved = sys.argv
    try:
        _initialize_distributed(ours)
        sys.argv = ["lm-eval", "run", "--model", "wings_jax", *rest]
        cli_evaluate()
    except (ConfigError, ConversionError, DataError, GenerationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        sys.argv = saved
    return 0


if __name__ == "__main__":
    sys.exit(main())
