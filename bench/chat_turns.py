"""Time to first token per chat turn: a ChatSession that keeps its decode cache against one that re-reads the
whole conversation every turn.

    python bench/chat_turns.py [--turns 5] [--message-tokens 48] [--new-tokens 32] [--rounds 5]

A random Wings model (stage finetune: learners of rank 64 and the router in every layer) on decode.py's LLM
shape (vocab 16000, width 512, MLP 1408, 8 layers, 8 heads) with a small SigLIP tower (112 px, patch 14: 64
image tokens; width 256, 4 layers). The first turn is 16 'system' tokens, the image and ``--message-tokens``
random text tokens; every later turn is ``--message-tokens`` random text tokens (no image, so the kept cache
is extended). Each reply is ``--new-tokens`` greedy tokens, no stop token. Time to first token of a turn: from
``reply`` until its first token reaches the host. Both modes run the whole chat once to compile every shape,
then alternate (which goes first alternates too) for ``--rounds`` rounds; figures are medians over rounds.
Both modes must give the same replies (checked).
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import numpy as np
from flax import nnx

from wings_jax.data.assemble import Prompt
from wings_jax.inference import ChatSession, Engine
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig
from wings_jax.model.wings import WingsModel, WingsModelConfig

LLM = QwenConfig(vocab_size=16000, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                 num_kv_heads=8)
VISION = SiglipConfig(image_size=112, patch_size=14, hidden_size=256, intermediate_size=1024, num_layers=4,
                      num_heads=4)
SYSTEM = 16  # tokens standing for the system turn (no learner reads them)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=5)
    parser.add_argument("--message-tokens", type=int, default=48)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    return parser.parse_args(argv)


def make_turns(cfg: WingsModelConfig, turns: int, message_tokens: int) -> list[Prompt]:
    rng = np.random.RandomState(0)
    text = lambda n: rng.randint(0, LLM.vocab_size, n).astype(np.int32)  # noqa: E731
    first = np.concatenate([text(SYSTEM), np.full(cfg.tokens_per_image, IMAGE_TOKEN_ID, np.int32),
                            text(message_tokens)])
    image = rng.uniform(-1, 1, (1, VISION.image_size, VISION.image_size, 3)).astype(np.float32)
    no_image = image[:0]
    prompts = [Prompt(first, np.arange(len(first), dtype=np.int32),
                      (np.arange(len(first)) >= SYSTEM) & (first != IMAGE_TOKEN_ID), image, np.ones(1, bool))]
    for _ in range(turns - 1):
        ids = text(message_tokens)
        prompts.append(Prompt(ids, np.arange(len(ids), dtype=np.int32), np.ones(len(ids), bool), no_image,
                              np.zeros(0, bool)))
    return prompts


def chat(engine: Engine, turns: list[Prompt], keep_cache: bool, new_tokens: int) -> tuple[list[float], list]:
    """Each turn's time to first token (s) and the replies."""
    session = ChatSession(engine, keep_cache)
    firsts, replies = [], []
    for turn in turns:
        arrived: list[float] = []
        start = time.perf_counter()
        replies.append(session.reply(turn, new_tokens, on_token=lambda row, token: arrived.append(time.perf_counter())))
        firsts.append(arrived[0] - start)
    return firsts, replies


def main(argv=None) -> None:
    args = parse_args(argv)
    cfg = WingsModelConfig(llm=LLM, vision=VISION, wings=WingsConfig(stage="finetune", lora_rank=64))
    engine = Engine(WingsModel(cfg, Runtime(), rngs=nnx.Rngs(0)))
    turns = make_turns(cfg, args.turns, args.message_tokens)
    modes = {"kept": True, "re-read": False}
    replies = {name: chat(engine, turns, keep, args.new_tokens)[1] for name, keep in modes.items()}  # compile
    assert replies["kept"] == replies["re-read"], "keeping the cache changed the replies"
    times: dict[str, list[list[float]]] = {name: [] for name in modes}
    for r in range(args.rounds):
        for name in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            times[name].append(chat(engine, turns, modes[name], args.new_tokens)[0])
    print(f"device: {jax.devices()[0].device_kind} ({jax.default_backend()}); LLM width {LLM.hidden_size}, "
          f"{LLM.num_layers} layers, vocab {LLM.vocab_size}; tower {VISION.image_size} px, width {VISION.hidden_size}")
    print(f"{args.turns} turns of {args.message_tokens} tokens (the first with {cfg.tokens_per_image} image tokens "
          f"after {SYSTEM} system tokens), {args.new_tokens} new tokens each, float32, greedy; medians of "
          f"{args.rounds} alternating rounds")
    length = 0
    for k, turn in enumerate(turns):
        length += len(turn.tokens)
        kept, reread = (statistics.median(t[k] for t in times[name]) for name in modes)
        print(f"turn {k + 1} (conversation {length} tokens): time to first token kept {kept * 1e3:7.1f} ms, "
              f"re-read {reread * 1e3:7.1f} ms ({reread / kept:.1f}x)")
        length += args.new_tokens


if __name__ == "__main__":
    main()
