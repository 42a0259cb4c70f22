"""Stage 1 ("pretrain") of the original recipe: LLaVA-Pretrain 558K, projector + visual learners trained.

    python -m wings_jax.convert import-hf --llm Qwen1.5-7B-Chat --vision siglip-so400m-patch14-384 --out CKPT
    python -m wings_jax.data.prepare --input blip_laion_cc_sbu_558k.json --image-root IMAGES \\
        --output gs://BUCKET/pretrain/data.array_record --num-shards 64
    python -m wings_jax.train --config configs/pretrain.py:main=gs://BUCKET/pretrain/data-*.array_record \\
        --config.init_from=CKPT --workdir gs://BUCKET/runs/stage1

Frozen: vision tower and the whole language model. lr 2e-5, cosine, 3% warmup, AdamW, clip 1.0,
global batch 256, 2048 tokens, bf16 compute (fp32 master weights). One epoch of 558K = 2180 steps.

Defaults (docs/scaling.md, compile-only plans): data parallel, remat full; it fits v5p-32 and up as is.
Smaller slices: v5p-16 --config.train.grad_accum=2; v5p-8 grad_accum=4; v5e: --config.mesh.data=1
--config.mesh.fsdp=-1 with grad_accum=8 on v5e-8, 4 on v5e-16.
"""
from wings_jax.training.recipes import full_size_config, sources_from_arg
from wings_jax.training.run_config import PRETRAIN_GROUPS


def get_config(arg: str | None = None):
    c = full_size_config("pretrain")
    c.data.sources = sources_from_arg(arg, ("main",), {"main": 1.0})
    c.train.update(dict(steps=2180, global_batch_size=256, grad_accum=1, loss_chunk=512, log_every=10))
    c.optim.groups = PRETRAIN_GROUPS
    c.optim.weight_decay = 0.0
    c.mesh.update(dict(data=-1, fsdp=1, tensor=1))
    c.checkpoint.update(dict(every=500, keep=2))
    return c
