"""Training-step throughput: tokens/s, step time and MFU of the real sharded train step on synthetic data.

    python bench/train_step.py --preset cpu-small --stage pretrain
    python bench/train_step.py --preset cpu-small --stage finetune
    python bench/train_step.py --preset orig-tiny --stage finetune   # issue 12's CPU shapes, fp32, remat none
    python bench/train_step.py --preset qwen1.8b-so400m --stage finetune --batch 8 --attention cudnn   # on a GPU

The step is ``wings_jax.training.plan.plan(...)``'s (the one training runs), on all local devices with a
data-parallel mesh, compiled ahead (XLA's memory plan of the step is printed). The first run is excluded;
the figures are the median of the timed steps. MFU uses wings_jax.flops (model FLOPs of the padded shapes)
and the device's peak;
on CPU, where no peak is listed, the step's FLOP rate is reported as a fraction of a 2048^3 float32
matmul timed in the same run instead.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from wings_jax import sharding
from wings_jax.model.attention import IMPLEMENTATIONS
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.flops import mfu, peak_flops_per_device
from wings_jax.model.layers import REMAT_POLICIES
from wings_jax.training.plan import initial_state, plan
from wings_jax.training.run_config import FINETUNE_GROUPS, PRETRAIN_GROUPS, base_config

PRESETS = {
    # ~9M parameters: a size this 2-core CPU steps through in about a second
    "cpu-small": dict(
        llm=dict(vocab_size=8192, hidden_size=256, intermediate_size=704, num_layers=4, num_heads=4, num_kv_heads=4),
        vision=dict(image_size=112, patch_size=14, hidden_size=192, intermediate_size=512, num_layers=2, num_heads=3),
        seq_len=256, batch=4, lora_rank=16),
    # Qwen1.5-1.8B + SigLIP so400m (26 layers), the recipe's 2048 tokens
    "qwen1.8b-so400m": dict(
        llm=dict(vocab_size=151936, hidden_size=2048, intermediate_size=5504, num_layers=24, num_heads=16,
                 num_kv_heads=16, rope_theta=1_000_000.0),
        vision=dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26,
                    num_heads=16),
        seq_len=2048, batch=8, lora_rank=64),
    # issue 12's CPU comparison with the original PyTorch code: 772 = 729 image tokens + 43 text tokens
    "orig-tiny": dict(
        llm=dict(vocab_size=300, hidden_size=128, intermediate_size=256, num_layers=3, num_heads=4, num_kv_heads=4,
                 rope_theta=1_000_000.0),
        vision=dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=256, num_layers=2,
                    num_heads=16),
        seq_len=772, batch=4, lora_rank=8, remat="none", loss_chunk=772),
}


def synthetic_batch(b: int, length: int, image_size: int, tokens_per_image: int, vocab: int, seed: int = 0) -> dict:
    """One image near the start of every row, random text around it, answers labelled after the image."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(0, vocab, (b, length)).astype(np.int32)
    tokens[:, 20:20 + tokens_per_image] = IMAGE_TOKEN_ID
    labels = np.where(np.arange(length) > 20 + tokens_per_image, tokens, -100).astype(np.int32)
    return {
        "tokens": tokens, "labels": labels, "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)),
        "segment_ids": np.ones((b, length), np.int32), "text_mask": tokens != IMAGE_TOKEN_ID,
        "images": rng.integers(0, 256, (b, 1, image_size, image_size, 3), dtype=np.uint8),
        "image_mask": np.ones((b, 1), bool),
    }


def matmul_flops_per_second(n: int = 2048, repeats: int = 5) -> float:
    """Median FLOP/s of an n^3 float32 matmul on the default device: this machine's practical peak."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    jax.block_until_ready(matmul(a, a))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(matmul(a, a))
        times.append(time.perf_counter() - start)
    return 2 * n ** 3 / statistics.median(times)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-small")
    parser.add_argument("--stage", choices=("pretrain", "finetune"), default="finetune")
    parser.add_argument("--batch", type=int, help="global batch (default: the preset's)")
    parser.add_argument("--seq-len", type=int)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--dtype", default=None, help="compute dtype (default: bfloat16 on accelerators, float32 on CPU)")
    parser.add_argument("--remat", choices=sorted(REMAT_POLICIES),
                        help="remat policy (default: the preset's, else attention)")
    parser.add_argument("--attention", default="xla", choices=IMPLEMENTATIONS)  # "splash": TPU only (interpreted elsewhere)
    parser.add_argument("--fsdp", type=int, default=1)
    parser.add_argument("--loss-positions", type=int, default=0,
                        help="train.loss_positions: project only this many labelled positions per row (0: all)")
    return parser.parse_args(argv)


def main() -> None:
    args = parse_args()

    preset = PRESETS[args.preset]
    c = base_config()
    c.model.llm.update(preset["llm"])
    c.model.vision.update(preset["vision"])
    seq_len = args.seq_len or preset["seq_len"]
    c.model.wings.update(dict(stage=args.stage, lora_rank=preset["lora_rank"], router_max_len=max(seq_len, 4096)))
    on_cpu = jax.default_backend() == "cpu"
    remat = args.remat or preset.get("remat", "attention")
    c.runtime.update(dict(dtype=args.dtype or ("float32" if on_cpu else "bfloat16"), remat=remat,
                          attention=args.attention))
    c.data.max_len = seq_len
    c.train.update(dict(steps=1000, global_batch_size=args.batch or preset["batch"],
                        loss_chunk=preset.get("loss_chunk", min(512, seq_len)), loss_positions=args.loss_positions))
    c.optim.groups = PRETRAIN_GROUPS if args.stage == "pretrain" else FINETUNE_GROUPS
    c.mesh.update(dict(data=-1, fsdp=args.fsdp, tensor=1))
    c.lock()

    mesh = sharding.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor)
    p = plan(c, mesh)
    trainable, frozen, opt_state = initial_state(p, seed=0)
    cfg = p.model_cfg
    host = synthetic_batch(c.train.global_batch_size, seq_len, cfg.vision.image_size, cfg.tokens_per_image,
                           cfg.llm.vocab_size)
    batch = {k: jax.device_put(v, p.batch_shapes[k].sharding) for k, v in host.items()}

    compiled = p.step_fn.lower(trainable, frozen, opt_state, jnp.int32(0), batch).compile()
    times = []
    for step in range(args.steps + 1):
        start = time.perf_counter()
        trainable, opt_state, metrics = compiled(trainable, frozen, opt_state, jnp.int32(step), batch)
        jax.block_until_ready(metrics["loss"])
        if step:  # step 0 warms up
            times.append(time.perf_counter() - start)
    seconds = statistics.median(times)
    tokens = c.train.global_batch_size * seq_len
    peak = peak_flops_per_device()
    utilisation = mfu(p.flops_per_step, seconds, peak, mesh.size)
    trainable_count = sum(x.size for x in jax.tree.leaves(trainable))
    total = trainable_count + sum(x.size for x in jax.tree.leaves(frozen))
    print(f"device: {jax.devices()[0].device_kind} x{mesh.size} ({jax.default_backend()})")
    print(f"preset {args.preset}, stage {args.stage}: {total / 1e6:.1f}M parameters ({trainable_count / 1e6:.1f}M "
          f"trainable), batch {c.train.global_batch_size} x {seq_len} tokens, {c.runtime.dtype} compute, "
          f"remat {remat}, attention {args.attention}, loss positions {args.loss_positions or 'all'}")
    print(f"step time {seconds * 1e3:.1f} ms (median of {len(times)}), {tokens / seconds:,.0f} tokens/s, "
          f"model FLOPs/step {p.flops_per_step:.3e}, "
          f"MFU {'n/a (peak unknown)' if utilisation is None else f'{utilisation:.1%}'}, "
          f"final loss {float(metrics['loss']):.3f}")
    memory = compiled.memory_analysis()
    if memory is not None:  # XLA's plan for the compiled step: activations and other temporaries, per device
        mib = lambda n: f"{n / 2**20:.1f} MiB"  # noqa: E731
        print(f"compiled memory per device: temporaries {mib(memory.temp_size_in_bytes)}, "
              f"arguments {mib(memory.argument_size_in_bytes)}, outputs {mib(memory.output_size_in_bytes)}")
    if utilisation is None:  # no listed peak (CPU): compare with a large matmul timed now, on the same machine
        rate = p.flops_per_step / seconds
        matmul = matmul_flops_per_second()
        print(f"step {rate / 1e9:.1f} GFLOP/s = {rate / matmul:.1%} of a 2048^3 float32 matmul "
              f"({matmul / 1e9:.1f} GFLOP/s, same run)")


if __name__ == "__main__":
    main()
