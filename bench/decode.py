"""Generation speed: prefill and decode tokens per second of a ~50M-parameter Qwen-shaped Wings model.

    python bench/decode.py [--batch-sizes 1,4] [--text-tokens 60] [--new-tokens 64] [--repeats 3] [--dtype float32]

The model is random (speed does not depend on the values): Qwen2 with 8 layers of width 512 (8 heads,
MLP 1408, vocab 16000), learners of rank 64 and the router in every layer (stage finetune), and a small
SigLIP tower (224 px, patch 16: 196 tokens per image, width 256, 4 layers). Each prompt is one image and
``--text-tokens`` text tokens (default: 256 in all, exactly a length bucket). Everything is compiled before
timing; each figure is the best of ``--repeats`` runs:
- prefill tokens/s: prompt tokens (image slots included) of the batch / time of generate(max_new_tokens=1);
- decode tokens/s: batch * (new_tokens - 1) / (time of generate(new_tokens) - time of the prefill).
"""
from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from wings_jax.data.assemble import Prompt
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.decoding import Decoder, bucket_length
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig
from wings_jax.model.wings import WingsModel, WingsModelConfig

CONFIG = WingsModelConfig(
    llm=QwenConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                   num_kv_heads=8),
    vision=SiglipConfig(image_size=224, patch_size=16, hidden_size=256, intermediate_size=1024, num_layers=4,
                        num_heads=4),
    wings=WingsConfig(stage="finetune", lora_rank=64, router_max_len=4096),
)


def make_prompt(text_tokens: int, rng: np.random.RandomState) -> Prompt:
    """The first 16 tokens stand for the system turn; the image follows them."""
    slots = CONFIG.tokens_per_image
    tokens = np.concatenate([rng.randint(0, 15000, 16), np.full(slots, IMAGE_TOKEN_ID),
                             rng.randint(0, 15000, text_tokens - 16)]).astype(np.int32)
    text_mask = tokens != IMAGE_TOKEN_ID
    text_mask[:16] = False
    size = CONFIG.vision.image_size
    return Prompt(tokens, np.arange(len(tokens), dtype=np.int32), text_mask,
                  rng.uniform(-1, 1, (1, size, size, 3)).astype(np.float32), np.ones(1, bool))


def best_time(fn, repeats: int) -> float:
    fn()  # compiles
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-sizes", default="1,4")
    parser.add_argument("--text-tokens", type=int, default=60)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    args = parser.parse_args()

    model = WingsModel(CONFIG, Runtime(dtype=args.dtype, param_dtype=args.dtype), rngs=nnx.Rngs(0))
    params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    vision = sum(x.size for x in jax.tree.leaves(nnx.state(model.vision, nnx.Param)))
    decoder = Decoder(model)
    rng = np.random.RandomState(0)
    prompt_len = args.text_tokens + CONFIG.tokens_per_image
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}), dtype {args.dtype}")
    print(f"model: {params / 1e6:.1f}M parameters ({vision / 1e6:.1f}M in the tower); {CONFIG.llm}")
    print(f"prompt: {prompt_len} tokens ({CONFIG.tokens_per_image} image slots; padded to "
          f"{bucket_length(prompt_len)}), {args.new_tokens} new tokens, greedy, cached decoding")
    for batch in (int(b) for b in args.batch_sizes.split(",")):
        prompts = [make_prompt(args.text_tokens, rng) for _ in range(batch)]
        prefill = best_time(lambda: decoder.generate(prompts, 1), args.repeats)
        total = best_time(lambda: decoder.generate(prompts, args.new_tokens), args.repeats)
        decode_rate = batch * (args.new_tokens - 1) / max(total - prefill, 1e-9)
        print(f"batch {batch}: prefill {batch * prompt_len / prefill:9.1f} tokens/s ({prefill * 1e3:7.1f} ms)   "
              f"decode {decode_rate:7.1f} tokens/s ({(total - prefill) / (args.new_tokens - 1) * 1e3:6.1f} ms/step)")


if __name__ == "__main__":
    main()
