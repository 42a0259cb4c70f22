"""Stage 2 ("finetune") of the original recipe: LLaVA-Instruct (+ text-only chat), everything but the tower trained.

    python -m wings_jax.train --config configs/finetune.py:main=gs://BUCKET/instruct/data-*.array_record,text=gs://BUCKET/text/data-*.array_record \\
        --config.init_from=gs://BUCKET/runs/stage1 --workdir gs://BUCKET/runs/stage2

init_from is a converted checkpoint or the stage-1 training workdir (its newest step); the routers
start fresh when it has none. Trained: language model, learners and routers (lr 2e-6), projector
(lr 1e-5); cosine, 3% warmup, AdamW, clip 1.0, global batch 64, 2048 tokens, bf16 compute.
Text-only data, when given, is mixed 1 part to 3 parts multimodal.

Defaults (docs/scaling.md, compile-only plans): FSDP over all chips, remat full; fits v5p-8 and up.
v5e-16 needs --config.train.grad_accum=4; from v5p-32 up --config.runtime.remat=dots is ~6% faster.
"""
from wings_jax.training.recipes import full_size_config, sources_from_arg
from wings_jax.training.run_config import FINETUNE_GROUPS


def get_config(arg: str | None = None):
    c = full_size_config("finetune")
    c.data.sources = sources_from_arg(arg, ("main", "text"), {"main": 3.0, "text": 1.0})
    c.train.update(dict(steps=10_400, global_batch_size=64, grad_accum=1, loss_chunk=512, log_every=10))
    c.optim.groups = FINETUNE_GROUPS
    c.optim.weight_decay = 1e-8
    c.mesh.update(dict(data=1, fsdp=-1, tensor=1))
    c.checkpoint.update(dict(every=1000, keep=2))
    return c
