"""Synthetic data of the forgetting experiment, written as the pipeline's LLaVA JSONL + PNG files.

Text-only skills (each generalises, so held-out items test a skill, not a memorised string):
    copy      "Repeat: cat tree fish"                   -> "cat tree fish"
    reverse   "Reverse: cat tree fish"                  -> "fish tree cat"
    largest   "Which is the largest: 3, 8, 5?"          -> "8"
    count     "How many words: cat tree fish dog?"      -> "4"
Image tasks (colours of drawn regions, which a random frozen tower's patch features keep: each patch
token is a fixed random function of its pixels and position):
    "What colour is the image?" (one colour), "What colour is the top/bottom/left/right half?" (two).
Stage 1 pairs images with descriptions; stage 2 asks the questions. Held-out items are multiple choice
(wings_jax.evaluate's format), never drawn from the training items; everything is a function of the seed.
"""
from __future__ import annotations

import dataclasses
import itertools
import json
import os
from typing import Iterator

import numpy as np
from PIL import Image

from wings_jax.data.demo import COLOURS
from wings_jax.data.tokenizer import build_local_qwen_tokenizer

WORDS = ("cat", "dog", "bird", "tree", "stone", "river", "apple", "house", "light", "water", "fish", "star")
SKILLS = ("copy", "reverse", "largest", "count")
HALVES = ("top", "bottom", "left", "right")
MAX_COUNT = 6


@dataclasses.dataclass(frozen=True)
class Files:
    """Where the experiment's data lives under one directory."""

    root: str

    def path(self, name: str) -> str:
        return os.path.join(self.root, name)

    text_train = property(lambda self: self.path("text_train.jsonl"))
    captions = property(lambda self: self.path("stage1_captions.jsonl"))
    questions = property(lambda self: self.path("stage2_questions.jsonl"))
    text_heldout = property(lambda self: self.path("heldout_text.jsonl"))
    mm_heldout = property(lambda self: self.path("heldout_mm.jsonl"))
    probe = property(lambda self: self.path("probe_mm.jsonl"))  # question before the image (attention view)
    images = property(lambda self: self.path("images"))
    tokenizer = property(lambda self: self.path("tokenizer"))


def _text_item(skill: str, rng: np.random.Generator) -> tuple[str, str, list[str]]:
    """(question, answer, distractors) of one skill."""
    if skill in ("copy", "reverse"):
        words = list(rng.choice(WORDS, size=3, replace=False))
        answer = words if skill == "copy" else words[::-1]
        others = [list(p) for p in itertools.permutations(words) if list(p) != answer]
        picks = rng.choice(len(others), size=3, replace=False)
        return f"{skill.capitalize()}: {' '.join(words)}", " ".join(answer), [" ".join(others[i]) for i in picks]
    if skill == "largest":
        digits = [int(d) for d in rng.choice(10, size=3, replace=False)]
        best = max(digits)
        return (f"Which is the largest: {', '.join(map(str, digits))}?", str(best),
                [str(d) for d in digits if d != best])
    n = int(rng.integers(1, MAX_COUNT + 1))
    words = rng.choice(WORDS, size=n, replace=True)
    return f"How many words: {' '.join(words)}?", str(n), [str(k) for k in range(1, MAX_COUNT + 1) if k != n]


def _text_items(rng: np.random.Generator, count: int, exclude: set[str]) -> Iterator[tuple[str, str, str, list[str]]]:
    """(skill, question, answer, distractors), cycling through the skills, questions never in ``exclude``."""
    made = 0
    while made < count:
        skill = SKILLS[made % len(SKILLS)]
        question, answer, distractors = _text_item(skill, rng)
        if question in exclude:
            continue
        made += 1
        yield skill, question, answer, distractors


def _draw(rng: np.random.Generator, size: int) -> tuple[np.ndarray, dict[str, str]]:
    """A picture of one or two colours, and what each region is ("image" or the halves that hold colours)."""
    names = list(COLOURS)
    short = int(rng.integers(size * 3 // 4, size + 1))  # varied aspect ratios exercise the padding
    width, height = (size, short) if rng.random() < 0.5 else (short, size)
    pixels = np.empty((height, width, 3), np.uint8)
    if rng.random() < 0.4:
        colour = names[rng.integers(len(names))]
        pixels[:] = COLOURS[colour]
        return pixels, {"image": colour}
    first, second = (names[i] for i in rng.choice(len(names), size=2, replace=False))
    if rng.random() < 0.5:
        pixels[: height // 2], pixels[height // 2:] = COLOURS[first], COLOURS[second]
        return pixels, {"top": first, "bottom": second}
    pixels[:, : width // 2], pixels[:, width // 2:] = COLOURS[first], COLOURS[second]
    return pixels, {"left": first, "right": second}


def _caption(regions: dict[str, str]) -> str:
    if "image" in regions:
        return f"All {regions['image']}."
    return ", ".join(f"{region} {colour}" for region, colour in regions.items()) + "."


def _image_question(regions: dict[str, str], rng: np.random.Generator) -> tuple[str, str]:
    region = "image" if "image" in regions else list(regions)[rng.integers(2)]
    question = "What colour is the image?" if region == "image" else f"What colour is the {region} half?"
    return question, regions[region]


def _write_jsonl(path: str, records: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)


def _chat(record_id: str, question: str, answer: str, image: str | None = None) -> dict:
    record = {"id": record_id, "conversations": [{"from": "human", "value": question},
                                                 {"from": "gpt", "value": answer}]}
    if image is not None:
        record["image"] = image
    return record


def make_data(root: str, *, text_records: int, image_records: int, heldout: int, seed: int = 0,
              image_size: int = 32, vocab_size: int = 512) -> Files:
    """Writes every file of :class:`Files` under ``root`` (``heldout`` questions per held-out set)."""
    files = Files(root)
    os.makedirs(files.images, exist_ok=True)
    rng = np.random.default_rng(seed)
    heldout_text = list(_text_items(rng, heldout, exclude=set()))
    _write_jsonl(files.text_heldout, [
        {"question": q, "options": [a, *d], "answer": 0, "subject": skill, "id": f"t{i}"}
        for i, (skill, q, a, d) in enumerate(heldout_text)])
    taken = {q for _, q, _, _ in heldout_text}
    _write_jsonl(files.text_train, [_chat(f"text{i}", q, a) for i, (_, q, a, _) in
                                    enumerate(_text_items(rng, text_records, exclude=taken))])

    captions, questions = [], []
    for i in range(image_records):
        pixels, regions = _draw(rng, image_size)
        name = f"{i:05d}.png"
        Image.fromarray(pixels).save(os.path.join(files.images, name))
        captions.append(_chat(f"cap{i}", "<image>\nDescribe the image.", _caption(regions), name))
        question, answer = _image_question(regions, rng)
        # the question comes before the image in half of the records, as in interleaved data
        value = f"<image>\n{question}" if rng.random() < 0.5 else f"{question}\n<image>"
        questions.append(_chat(f"mm{i}", value, answer, name))
    _write_jsonl(files.captions, captions)
    _write_jsonl(files.questions, questions)

    mm, probe = [], []
    for i in range(heldout):
        pixels, regions = _draw(rng, image_size)
        name = f"heldout_{i:04d}.png"
        Image.fromarray(pixels).save(os.path.join(files.images, name))
        question, answer = _image_question(regions, rng)
        common = {"options": list(COLOURS), "answer": answer, "image": os.path.join("images", name), "id": f"m{i}"}
        mm.append({"question": question, **common})
        probe.append({"question": f"{question}\n<image>", **common})
    _write_jsonl(files.mm_heldout, mm)
    _write_jsonl(files.probe, probe)
    build_local_qwen_tokenizer(files.tokenizer, vocab_size=vocab_size)
    return files
