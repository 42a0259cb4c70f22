"""A wings_jax checkpoint as a model of EleutherAI's lm-evaluation-harness.

    python -m wings_jax.lm_eval --model_args ckpt=CKPT[,dtype=bfloat16,max_length=2048,max_gen_toks=256] \\
        --tasks mmlu,arc_easy --batch_size 16 [every other lm_eval flag: --include_path, --limit, --num_fewshot,
        --output_path, --log_samples, --apply_chat_template, ...]
        [--coordinator_address HOST:PORT --num_processes N --process_id I | --distributed]

registers the model ``wings_jax`` with lm-eval and hands the command line over to lm-eval's own ``run``.
``CKPT`` is a converted checkpoint or a training workdir (its newest step). Requests are raw text as lm-eval
sends them (ChatML only with ``--apply_chat_template``); a text-only row is the base LLM plus its routed
textual learner. ``loglikelihood`` and ``loglikelihood_rolling`` run the jitted teacher-forced scorer
(:meth:`wings_jax.inference.Engine.continuation_scores`), ``generate_until`` greedy or sampled KV-cache decoding;
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
import pickle
import sys
from typing import Any, Sequence

import jax
import numpy as np
from jax.experimental import multihost_utils
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from wings_jax import distributed
from wings_jax.harness import HarnessModel, hand_over, settings_groups


@register_model("wings_jax")
class WingsLM(TemplateLM):
    """lm-eval's ``LM`` over a wings_jax checkpoint (see the module docstring)."""

    def __init__(self, ckpt: str, dtype: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size: int | str = 8, max_batch_size: int | None = None, device: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        del max_batch_size, device  # lm-eval always passes them; JAX places the work on this host's devices
        self.harness = HarnessModel(ckpt, dtype, batch_size, max_length, max_gen_toks, seed)
        self.tokenizer = self.harness.tokenizer
        self._rank, self._world_size = jax.process_index(), jax.process_count()

    @property
    def eot_token_id(self) -> int:
        return self.harness.eot_token_id

    @property
    def max_length(self) -> int:
        return self.harness.max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, add_special_tokens=bool(add_special_tokens))

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  continue_final_message=not add_generation_prompt)

    def get_model_info(self) -> dict:
        return self.harness.info()

    def _loglikelihood_tokens(self, requests: list[tuple[Any, list[int], list[int]]], disable_tqdm: bool = False,
                              **kwargs) -> list[tuple[float, bool]]:
        rows = []
        for _, context, continuation in requests:
            tokens = (context + continuation)[-(self.max_length + 1):]  # as lm-eval's hf model truncates
            rows.append((self.harness.text_prompt(tokens), min(len(continuation), len(tokens) - 1)))
        with tqdm(total=len(rows), desc="loglikelihood", disable=disable_tqdm or self.rank != 0) as bar:
            out = self.harness.score(rows, bar.update)
        for (key, _, _), result in zip(requests, out):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, result)
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

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups = settings_groups([req.args[1] for req in requests])  # one generation setting per batch
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm or self.rank != 0) as bar:
            for members in groups.values():
                settings = self.harness.generation_settings(requests[members[0]].args[1])
                keep = self.max_length - settings.max_new  # the context's last tokens, as lm-eval's hf model
                prompts = [self.harness.text_prompt(self.tok_encode(requests[i].args[0])[-keep:]) for i in members]
                for i, text in zip(members, self.harness.generate(prompts, settings)):
                    out[i] = text
                    self.cache_hook.add_partial("generate_until", requests[i].args, text)
                bar.update(len(members))
        return out

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


def main(argv: Sequence[str] | None = None) -> int:
    from lm_eval.__main__ import cli_evaluate

    flags = distributed.add_flags(argparse.ArgumentParser(add_help=False))  # --help goes on to lm-eval's own
    ours, rest = flags.parse_known_args(sys.argv[1:] if argv is None else list(argv))
    return hand_over(cli_evaluate, ["lm-eval", "run"], rest, before=lambda: distributed.initialize(ours))


if __name__ == "__main__":
    sys.exit(main())
