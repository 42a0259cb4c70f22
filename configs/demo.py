"""The built-in demo: a tiny Wings model learns a synthetic colour / arithmetic chat set on CPU.

    python -m wings_jax.train                      # this config, workdir runs/demo
    python -m wings_jax.train --config configs/demo.py --config.train.steps=50

The data set (images, conversations, tokenizer) is generated into ``demo_data.dir`` on first use.
"""
from wings_jax.training.run_config import FINETUNE_GROUPS, base_config


def get_config():
    c = base_config()
    c.model.llm.update(dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4,
                            num_kv_heads=2, rope_theta=10_000.0, max_position_embeddings=256))
    c.model.vision.update(dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2,
                               num_heads=2))  # 16 tokens per image
    c.model.wings.update(dict(stage="finetune", lora_rank=8, router_max_len=128))
    c.runtime.update(dict(dtype="float32", remat="none"))
    c.demo_data.dir = "runs/demo_data"
    c.demo_data.num_records = 512
    c.data.max_len = 128
    c.data.max_images = 1
    c.train.update(dict(steps=300, global_batch_size=16, log_every=10, loss_chunk=128))
    # From scratch, every group learns, faster than the recipes' fine-tuning rates.
    c.optim.groups = {name: dict(group, lr=3e-3) for name, group in FINETUNE_GROUPS.items()}
    c.optim.warmup_ratio = 0.05
    c.checkpoint.update(dict(every=100, keep=2))
    return c
