"""Chat with a Wings checkpoint.

    python -m wings_jax.generate --ckpt CKPT --prompt "What is in the picture?" --image cat.jpg
    python -m wings_jax.generate --ckpt CKPT            # interactive: one user message per line

The conversation is formatted as in training (ChatML, default system turn, ``<image>`` placeholders
expanded to image slots) and ends with the assistant header ``<|im_start|>assistant\\n``. Without an
``<image>`` in the text, each image goes on its own line before it. Generation stops at ``<|im_end|>``
or ``<|endoftext|>`` (unless --ignore-eos) or after --max-new-tokens (default 256, fewer when the
prompt leaves less room before the model's length limit; a value given explicitly that does not fit is
refused).

Without --json the reply is written to stdout as it is produced (each piece as soon as its tokens
reach the host and decode to whole characters), then a newline.

Interactive mode reads stdin until EOF or ``/exit``; a line ``/image PATH`` attaches an image to the next
message. The conversation is kept as the tokens read and generated (a reply is never re-tokenized from its
text), and so is the model's decode cache: a message reads only its own tokens (and images), except that a
message with an image re-reads the whole conversation unless the model has ``causal_images``, as does every
message to a ``mixing='reference'`` model (see ``inference.ChatSession``); either way the reply is the one a
re-read of the conversation's tokens gives.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Callable, Sequence, TextIO

import numpy as np
from etils import epath

from wings_jax.checkpoint import CheckpointError
from wings_jax.data.constants import DEFAULT_SYSTEM_PROMPT
from wings_jax.data.conversation import Turn
from wings_jax.data.checks import position_limit
from wings_jax.data.errors import DataError
from wings_jax.inference import (ChatSession, Engine, GenerationError, Sampling, detokenize, encode_chat,
                                 encode_chat_turn, load_for_inference, stop_token_ids, with_image_placeholders)

EXIT_COMMAND, IMAGE_COMMAND = "/exit", "/image "
DEFAULT_MAX_NEW_TOKENS = 256


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wings_jax.generate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted checkpoint or training workdir (holds the tokenizer)")
    p.add_argument("--prompt", help="the user message; without it, chat interactively on stdin")
    p.add_argument("--image", action="append", default=[], metavar="PATH",
                   help="image for the (first) message; repeatable")
    p.add_argument("--system", default=DEFAULT_SYSTEM_PROMPT, help="system turn")
    p.add_argument("--max-new-tokens", type=int,
                   help=f"default: {DEFAULT_MAX_NEW_TOKENS}, capped to what the model's length limit leaves")
    p.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--top-p", type=float, default=1.0, help="1: off")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ignore-eos", action="store_true", help="never stop before --max-new-tokens")
    p.add_argument("--json", action="store_true", help="print {prompt_token_ids, generated_token_ids, text}")
    p.add_argument("--save-logits", metavar="FILE.npy",
                   help="write the float32 logits [prompt_len, vocab] of the prompt's teacher-forced forward")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on accelerators, float32 on CPU")
    return p


class TextStream:
    """Writes a reply's text as its tokens arrive: what the tokens so far decode to, past what is already
    written; text ending in a partial UTF-8 character (decoded as U+FFFD) waits for the next token."""

    def __init__(self, tokenizer, out: TextIO):
        self.tokenizer, self.out = tokenizer, out
        self.ids: list[int] = []
        self.written = ""

    def __call__(self, row: int, token: int) -> None:
        self.ids.append(token)
        self._write(detokenize(self.tokenizer, self.ids), hold_partial=True)

    def _write(self, text: str, hold_partial: bool = False) -> None:
        if text.startswith(self.written) and not (hold_partial and text.endswith("\ufffd")):
            self.out.write(text[len(self.written):])
            self.out.flush()
            self.written = text

    def finish(self, text: str) -> None:
        self._write(text)
        print(file=self.out, flush=True)


class Chat:
    """One conversation with a loaded model (a :class:`ChatSession`) and how to answer the next message."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.sampling = Sampling(args.temperature, args.top_k, args.top_p)  # refuse bad settings before loading
        model, self.tokenizer = load_for_inference(args.ckpt, args.dtype)
        self.cfg = model.cfg  # not the model: the engine holds its own (separate-layer) copy of the weights
        self.session = ChatSession(Engine(model))
        self.stop_ids = () if args.ignore_eos else stop_token_ids(self.tokenizer)

    def check_images(self, paths: Sequence[str]) -> None:
        if paths and self.cfg.vision is None:
            raise GenerationError(f"checkpoint {self.args.ckpt!r} has no vision tower; it cannot take images "
                                  f"({', '.join(paths)})")
        for path in paths:
            if not epath.Path(path).is_file():
                raise GenerationError(f"image file {path!r} does not exist")

    def max_new_tokens(self, prompt_length: int) -> int:
        """--max-new-tokens if given (the engine refuses it if it does not fit); otherwise the default,
        capped to the room the model's length limit leaves after the prompt."""
        if self.args.max_new_tokens is not None:
            return self.args.max_new_tokens
        limit = position_limit(self.cfg)
        room = DEFAULT_MAX_NEW_TOKENS if limit is None else limit - prompt_length
        if 1 <= room < DEFAULT_MAX_NEW_TOKENS:
            print(f"note: generating at most {room} new tokens (the model takes {limit} positions, the prompt "
                  f"has {prompt_length}); --max-new-tokens sets it", file=sys.stderr)
            return room
        return DEFAULT_MAX_NEW_TOKENS  # room < 1: the engine refuses the prompt as too long

    def answer(self, message: str, images: Sequence[str], on_token: Callable[[int, int], None] | None = None) -> dict:
        """Generates the reply to ``message`` (its tokens go to ``on_token`` as they come); the conversation
        only grows when that succeeds."""
        self.check_images(images)
        text = with_image_placeholders(message, len(images))
        if self.session.prompt is None:
            turn = encode_chat(self.cfg, self.tokenizer, [Turn("user", text)], images,
                               system_prompt=self.args.system)
        else:
            turn = encode_chat_turn(self.cfg, self.tokenizer, text, images)
        prompt = self.session.prompt_for(turn)
        result = self.session.reply(turn, self.max_new_tokens(len(prompt.tokens)), self.sampling, self.stop_ids,
                                    seed=self.args.seed, on_token=on_token)
        text = detokenize(self.tokenizer, result.token_ids)
        if self.args.save_logits:
            np.save(self.args.save_logits, self.session.engine.logits([prompt])[0])
        return {"prompt_token_ids": prompt.tokens.tolist(), "generated_token_ids": result.token_ids, "text": text,
                "finish_reason": result.finish_reason}

    def reply(self, message: str, images: Sequence[str]) -> None:
        """Answers ``message`` on stdout: streamed text, or one JSON line once the reply is complete."""
        if self.args.json:
            print(json.dumps(self.answer(message, images)), flush=True)
            return
        stream = TextStream(self.tokenizer, sys.stdout)
        stream.finish(self.answer(message, images, stream)["text"])


def _interactive(chat: Chat) -> None:
    pending = list(chat.args.image)
    prompt_user = sys.stdin.isatty()
    while True:
        if prompt_user:
            print("> ", end="", file=sys.stderr, flush=True)
        line = sys.stdin.readline()
        if not line or line.strip() == EXIT_COMMAND:
            return
        line = line.rstrip("\n")
        if line.startswith(IMAGE_COMMAND):
            pending.append(line[len(IMAGE_COMMAND):].strip())
            continue
        if not line.strip():
            continue
        try:
            chat.reply(line, pending)
        except (DataError, GenerationError) as e:  # this message is dropped; the conversation goes on
            print(f"error: {e}", file=sys.stderr)
        pending = []


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.save_logits and args.prompt is None:
        print("error: --save-logits needs --prompt (it saves the logits of that one prompt)", file=sys.stderr)
        return 2
    try:
        chat = Chat(args)
        chat.check_images(args.image)
        if args.prompt is None:
            _interactive(chat)
        else:
            chat.reply(args.prompt, args.image)
    except (CheckpointError, DataError, GenerationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
