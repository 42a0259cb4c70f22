"""A wings_jax checkpoint as a model of lmms-eval (EvolvingLMMs-Lab's multimodal evaluation harness).

    python -m wings_jax.lmms_eval --model_args ckpt=CKPT[,dtype=bfloat16,max_length=2048,max_gen_toks=256] \\
        --tasks mme,mmbench_en_dev --batch_size 8 [every other lmms-eval flag: --include_path, --limit,
        --output_path, --log_samples, ...]

registers the model ``wings_jax`` with lmms-eval and hands the command line over to lmms-eval's own CLI
(``pip install 'wings_jax[lmms]'``). Every request is one user turn of Wings' ChatML conversation (the
system prompt first, one ``<image>`` line per image before the text unless the text places them), its
images read by ``wings_jax.data.images`` (padded to squares, resized, normalised) and encoded by the
tower; ``loglikelihood`` scores the continuation after the assistant header (as lmms-eval's own models do:
its mean negative log-likelihood per token, see :meth:`WingsLMMS.loglikelihood`), ``generate_until`` decodes
there. Batching, devices and reference-mode checkpoints are as in ``python -m wings_jax.lm_eval``.

Several hosts (a pod slice), the choice of ``python -m wings_jax.lm_eval``: each host is one lmms-eval rank that
scores its share of the documents on its own devices with a full copy of the parameters; rank 0 gathers the
samples and writes the results. lmms-eval gathers with torch.distributed, so the ranks are torchrun's
(``WORLD_SIZE``, ``RANK``, ``MASTER_ADDR``, ``MASTER_PORT``), on every host::

    torchrun --nnodes N --node_rank I --nproc_per_node 1 --master_addr HOST0 --master_port 29500 \\
        -m wings_jax.lmms_eval --model_args ckpt=CKPT ...
"""
from __future__ import annotations

import os
import sys
from typing import Any, Sequence

import numpy as np
from lmms_eval.api.instance import GenerationResult
from lmms_eval.api.model import lmms
from lmms_eval.models import MODEL_REGISTRY_V2
from lmms_eval.models.registry_v2 import ModelManifest
from PIL import Image
from tqdm import tqdm

from wings_jax.config import ConfigError
from wings_jax.data.assemble import Prompt
from wings_jax.data.conversation import Turn
from wings_jax.data.errors import DataError
from wings_jax.inference import GenerationError, encode_chat, with_continuation, with_image_placeholders
from wings_jax.harness import HarnessModel, hand_over, settings_groups


class WingsLMMS(lmms):
    """lmms-eval's ``lmms`` over a wings_jax checkpoint (see the module docstring)."""

    is_simple = True
    device = "cpu"  # where lmms-eval puts the tensors of its gloo collectives; the JAX work runs on this host's devices

    def __init__(self, ckpt: str, dtype: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 batch_size: int | str = 8, max_batch_size: int | None = None, device: str | None = None,
                 seed: int = 0) -> None:
        super().__init__()
        del max_batch_size, device  # lmms-eval always passes them; JAX places the work on this host's devices
        self.harness = HarnessModel(ckpt, dtype, batch_size, max_length, max_gen_toks, seed)
        self._rank, self._world_size = 0, 1  # lmms-eval sets them when it distributes

    def _doc(self, doc_id, task, split) -> dict:
        return self.task_dict[task][split][doc_id]

    def _prompt(self, context: str, visuals: Sequence[Any] | None, where: str) -> Prompt:
        images = [v for v in (visuals or []) if v is not None]
        if any(not isinstance(v, Image.Image) for v in images):
            raise DataError(f"{where}: the wings_jax model takes images only, got "
                            f"{sorted({type(v).__name__ for v in images})}")
        harness = self.harness
        return encode_chat(harness.cfg, harness.tokenizer,
                           [Turn("user", with_image_placeholders(context, len(images)))], images)

    def loglikelihood(self, requests) -> list[GenerationResult]:
        """(loss, whether every continuation token is the greedy choice) per request, where the loss is the
        continuation's mean negative log-likelihood per token: lmms-eval's multiple-choice scoring picks the
        option of least value (its LLaVA model returns this loss), so its ``acc`` is ``wings_jax.evaluate
        --score mean``. Each pair is wrapped in a ``GenerationResult``: lmms-eval 0.7.3 turns any other
        non-string response into its ``str()``, which its scoring cannot unpack."""
        rows = []
        for context, target, doc_to_visual, doc_id, task, split in (r.args for r in requests):
            doc, where = self._doc(doc_id, task, split), f"{task}/{split}/{doc_id}"
            continuation = target(doc) if callable(target) else target
            prompt = self.harness.engine.with_image_features(self._prompt(context, doc_to_visual(doc), where))
            ids = np.asarray(self.harness.tokenizer(continuation, add_special_tokens=False)["input_ids"], np.int32)
            if not len(ids):
                raise GenerationError(f"{where}: the continuation {continuation!r} has no tokens to score")
            if len(prompt.tokens) + len(ids) > self.harness.max_length + 1:
                raise GenerationError(f"{where}: {len(prompt.tokens) + len(ids)} tokens with the continuation, "
                                      f"more than max_length={self.harness.max_length} + 1; raise model_args max_length")
            rows.append((with_continuation(prompt, ids), len(ids)))
        with tqdm(total=len(rows), desc="loglikelihood", disable=self.rank != 0) as bar:
            scores = self.harness.score(rows, bar.update)
        return [GenerationResult((-total / k, greedy)) for (total, greedy), (_, k) in zip(scores, rows)]

    def generate_until(self, requests) -> list[str]:
        groups = settings_groups([req.args[1] for req in requests])  # one generation setting per batch
        out: list[str | None] = [None] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=self.rank != 0) as bar:
            for members in groups.values():
                settings = self.harness.generation_settings(requests[members[0]].args[1])
                prompts = []
                for i in members:
                    context, _, doc_to_visual, doc_id, task, split = requests[i].args
                    doc = self._doc(doc_id, task, split)
                    prompts.append(self._prompt(context, doc_to_visual(doc), f"{task}/{split}/{doc_id}"))
                for i, text in zip(members, self.harness.generate(prompts, settings)):
                    out[i] = text
                bar.update(len(members))
        return out

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("the wings_jax model does not run multi-round generation tasks")


MODEL_REGISTRY_V2.register_manifest(ModelManifest(model_id="wings_jax", simple_class_path=f"{__name__}.WingsLMMS"),
                                    overwrite=True)


def _join_hosts() -> None:
    """With ``WORLD_SIZE`` > 1, the gloo group lmms-eval gathers over (CPU tensors whatever the host's devices:
    left to lmms-eval, accelerate would take NCCL where torch sees a GPU)."""
    import torch.distributed as dist

    world = os.environ.get("WORLD_SIZE", "1")
    if world == "1" or dist.is_initialized():
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(k)]
    if missing:
        raise ConfigError(f"WORLD_SIZE={world} needs {', '.join(missing)} set too (torchrun sets them all)")
    dist.init_process_group("gloo")


def main(argv: Sequence[str] | None = None) -> int:
    from lmms_eval.__main__ import cli_evaluate

    return hand_over(cli_evaluate, ["lmms-eval"], sys.argv[1:] if argv is None else list(argv), before=_join_hosts)


if __name__ == "__main__":
    sys.exit(main())
