"""A small synthetic data set that a tiny model learns within a few hundred CPU steps.

`make_demo_dataset(out_dir)` writes
    out_dir/multimodal.jsonl   LLaVA-format records: "What colour is the image?" about a solid colour,
                               "What colour is the top/bottom half?" about a two-colour image -> the colour
    out_dir/text.jsonl         text-only chat: small additions, copying a word
    out_dir/images/            PNG and JPEG files of varied sizes and aspect ratios
    out_dir/tokenizer/         the local Qwen-style tokenizer (tokenizer.build_local_qwen_tokenizer)
Three quarters of the records are multimodal. Everything is a function of the seed.
"""
from __future__ import annotations

import dataclasses
import json
import os

import ml_collections
import numpy as np
from PIL import Image

from .pipeline import source_config
from .tokenizer import build_local_qwen_tokenizer

COLOURS = {
    "red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (240, 220, 40),
    "black": (15, 15, 15), "white": (245, 245, 245), "orange": (250, 140, 20), "purple": (140, 50, 180),
}
_WORDS = ("apple", "river", "stone", "cat", "dog", "tree", "house", "light", "water", "bird")


@dataclasses.dataclass(frozen=True)
class DemoDataset:
    multimodal_jsonl: str
    text_jsonl: str
    image_root: str
    tokenizer_dir: str
    num_records: int

    @classmethod
    def in_dir(cls, out_dir: str | os.PathLike, num_records: int) -> "DemoDataset":
        """The layout of a demo data set written to ``out_dir``."""
        out_dir = os.fspath(out_dir)
        return cls(os.path.join(out_dir, "multimodal.jsonl"), os.path.join(out_dir, "text.jsonl"),
                   os.path.join(out_dir, "images"), os.path.join(out_dir, "tokenizer"), num_records)

    def source_configs(self, multimodal_weight: float = 3.0, text_weight: float = 1.0
                       ) -> list[ml_collections.ConfigDict]:
        """``data.sources`` entries for the two files, mixed by the given weights."""
        return [
            source_config("llava_json", self.multimodal_jsonl, image_root=self.image_root, weight=multimodal_weight),
            source_config("llava_json", self.text_jsonl, weight=text_weight),
        ]


def make_demo_dataset(out_dir: str | os.PathLike, num_records: int = 512, seed: int = 0, image_size: int = 48,
                      vocab_size: int = 512) -> DemoDataset:
    """Writes the demo data set (see the module docstring); ``image_size`` is the longer side of the images."""
    dataset = DemoDataset.in_dir(out_dir, num_records)
    os.makedirs(dataset.image_root, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(COLOURS)
    num_multimodal = (3 * num_records) // 4
    multimodal, text = [], []
    for i in range(num_multimodal):
        # Varied aspect ratios exercise the padding; both encoders exercise decoding.
        short = int(rng.integers(image_size // 2, image_size + 1))
        width, height = (image_size, short) if rng.random() < 0.5 else (short, image_size)
        pixels = np.empty((height, width, 3), np.uint8)
        if rng.random() < 0.5:
            colour = names[rng.integers(len(names))]
            pixels[:] = COLOURS[colour]
            question, answer = rng.choice(["What colour is the image?", "What is the colour of this picture?"]), colour
        else:
            top, bottom = rng.choice(len(names), size=2, replace=False)
            pixels[: height // 2] = COLOURS[names[top]]
            pixels[height // 2:] = COLOURS[names[bottom]]
            half = "top" if rng.random() < 0.5 else "bottom"
            question, answer = f"What colour is the {half} half?", names[top if half == "top" else bottom]
        file_name = f"{i:05d}." + ("png" if i % 2 == 0 else "jpg")
        Image.fromarray(pixels).save(os.path.join(dataset.image_root, file_name), quality=95)
        value = f"<image>\n{question}" if rng.random() < 0.8 else f"{question}\n<image>"
        multimodal.append({"id": f"mm{i}", "image": file_name, "conversations": [
            {"from": "human", "value": value}, {"from": "gpt", "value": f"It is {answer}."}]})
    for i in range(num_records - num_multimodal):
        if rng.random() < 0.5:
            a, b = (int(x) for x in rng.integers(0, 10, size=2))
            turns = [(f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}.")]
        else:
            word = _WORDS[rng.integers(len(_WORDS))]
            turns = [(f"Copy this word: {word}.", word)]
        conversations = [m for q, a in turns for m in ({"from": "human", "value": q}, {"from": "gpt", "value": a})]
        text.append({"id": f"text{i}", "conversations": conversations})

    for path, records in ((dataset.multimodal_jsonl, multimodal), (dataset.text_jsonl, text)):
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
    build_local_qwen_tokenizer(dataset.tokenizer_dir, vocab_size=vocab_size)
    return dataset


def ensure_demo_dataset(out_dir: str | os.PathLike, num_records: int = 512) -> DemoDataset:
    """The demo data set in ``out_dir``, written first if it is not there yet."""
    dataset = DemoDataset.in_dir(out_dir, num_records)
    if not os.path.exists(os.path.join(dataset.tokenizer_dir, "tokenizer.json")):
        return make_demo_dataset(out_dir, num_records=num_records)
    return dataset
