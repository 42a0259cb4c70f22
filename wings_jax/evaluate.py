"""Multiple-choice evaluation by option log-likelihood (e.g. text-only retention: MMLU-style questions).

    python -m wings_jax.evaluate --ckpt CKPT --data questions.jsonl [--batch-size 8] [--score sum|mean]
                                 [--output results.json]

One JSON object per line::

    {"question": "...", "options": ["...", ...] or {"A": "...", ...}, "answer": "B" (key / letter, or the
     option's text, or a 0-based index into a list), "image": "img.png" (optional, relative to the file's
     directory), "subject": "..." (optional), "id": ... (optional)}

Each option is scored by the sum (``--score mean``: the mean) of the log-probabilities of its tokens
after the generation prompt of the question (ChatML, the question as the user turn, ``<image>`` first if there is an image), exactly as
the model would have to write it. The prediction is the best-scoring option. (question, option) rows run
through the teacher-forced forward in batches of fixed size, padded to bucketed lengths, so few shapes
are ever compiled; only the positions that predict option tokens are projected onto the vocabulary, and a
question's image goes through the vision tower once for all its options.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from wings_jax.checkpoint import CheckpointError
from wings_jax.data.errors import DataError
from wings_jax.inference import GenerationError, load_for_inference
from wings_jax.multiple_choice import SCORES, evaluate, read_questions


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m wings_jax.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", required=True, help="converted checkpoint or training workdir (holds the tokenizer)")
    p.add_argument("--data", required=True, help="JSON-lines file of multiple-choice questions")
    p.add_argument("--batch-size", type=int, default=8,
                   help="(question, option) rows per forward (memory: batch x longest option x vocab float32 "
                        "logits)")
    p.add_argument("--score", choices=SCORES, default="sum",
                   help="an option's score: the sum of its tokens' log-likelihoods, or their mean (per token)")
    p.add_argument("--output", help="also write the results here (JSON)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="default: bfloat16 on accelerators, float32 on CPU")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        questions = read_questions(args.data)  # every record is checked before the model is loaded
        model, tokenizer = load_for_inference(args.ckpt, args.dtype)
        results = evaluate(model, tokenizer, questions, args.batch_size, score=args.score)
    except (CheckpointError, DataError, GenerationError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = json.dumps(results, indent=2)
    print(text)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
