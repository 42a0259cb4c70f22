"""Reliability figures for README.md: bad-record kinds and what the pipeline does with each, and CLI mistakes
with the message each gives. Tiny local fixtures; about a minute on a 2-core CPU.

    python bench/reliability.py            # prints two Markdown tables
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import re
import sys
import tempfile

import numpy as np
from flax import nnx
from PIL import Image

from wings_jax.convert.__main__ import main as convert_main
from wings_jax.checkpoint import save_model
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.data.errors import DataError
from wings_jax.data.pipeline import default_data_config, make_data_iterator, source_config
from wings_jax.data.prepare import main as prepare_main
from wings_jax.data.tokenizer import load_tokenizer
from wings_jax.evaluate import main as evaluate_main
from wings_jax.generate import main as generate_main
from wings_jax.model.learners import WingsConfig
from wings_jax.model.qwen import QwenConfig
from wings_jax.model.runtime import Runtime
from wings_jax.model.siglip import SiglipConfig
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.train import main as train_main

IMAGE, PATCH = 32, 8
TOKENS_PER_IMAGE = (IMAGE // PATCH) ** 2
GOOD = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]


def bad_records(root: str) -> dict[str, bytes]:
    """One raw JSONL line per kind of bad record; the files they need are written under root/images."""
    images = os.path.join(root, "images")
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    with open(os.path.join(images, "cut.jpg"), "wb") as f:
        f.write(jpeg.getvalue()[:400])
    with open(os.path.join(images, "notes.png"), "w") as f:
        f.write("text, not pixels")
    Image.new("RGB", (8, 8)).save(os.path.join(images, "ok.png"))

    def line(**record) -> bytes:
        return json.dumps({"id": "bad", **record}).encode()

    two = [{"from": "human", "value": "<image><image>\nWhich colours?"}, {"from": "gpt", "value": "red, blue"}]
    return {
        "missing image file": line(image="nowhere.png", conversations=GOOD),
        "truncated JPEG": line(image="cut.jpg", conversations=GOOD),
        "file that is not an image": line(image="notes.png", conversations=GOOD),
        "placeholders != images": line(image=["ok.png", "ok.png"], conversations=GOOD),
        "empty conversation": line(conversations=[]),
        "no 'conversations' key": line(image="ok.png"),
        "unknown role": line(conversations=[{"from": "robot", "value": "hi"}, {"from": "gpt", "value": "x"}]),
        "ends with a question": line(conversations=GOOD[:1]),
        "not valid JSON": b'{"id": "bad", "conversations": [',
        "not valid UTF-8": b'{"id": "\xff\xfe", "conversations": []}',
        "two images, max_images=1": line(image=["ok.png", "ok.png"], conversations=two),
        "answer beyond max_len": line(conversations=[{"from": "human", "value": "more " * 200},
                                                     {"from": "gpt", "value": "x"}]),
    }


def record_outcomes(root: str, tokenizer) -> list[tuple[str, str, str]]:
    rows = []
    good = [json.dumps({"id": str(i), "image": "ok.png", "conversations": GOOD}).encode() for i in range(4)]
    for name, raw in bad_records(root).items():
        path = os.path.join(root, "data.jsonl")
        with open(path, "wb") as f:
            f.write(b"\n".join([*good[:2], raw, *good[2:]]) + b"\n")
        outcome = []
        for policy in ("error", "skip"):
            cfg = default_data_config()
            cfg.sources = [source_config("llava_json", path, image_root=os.path.join(root, "images"))]
            cfg.update(dict(max_len=128, max_images=1, shuffle=False, num_epochs=1, bad_record_policy=policy,
                            max_bad_fraction=0.5))
            it = make_data_iterator(cfg, tokenizer=tokenizer, image_size=IMAGE, tokens_per_image=TOKENS_PER_IMAGE,
                                    global_batch_size=1)
            try:
                n = sum(1 for _ in it)
                outcome.append(f"{n} rows; {it.stats.summary()}")
            except DataError as e:
                first = re.split(r"(?<=[.;]) ", str(e).splitlines()[0].replace(root, "$TMP"))[0].rstrip(".;")
                outcome.append(f"stops, kind `{e.kind}`: {first}")
            finally:
                it.close()
        rows.append((name, *outcome))
    return rows


def _tiny_checkpoint(root: str, tokenizer_dir: str) -> str:
    cfg = WingsModelConfig(
        llm=QwenConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2),
        vision=SiglipConfig(image_size=IMAGE, patch_size=PATCH, hidden_size=16, intermediate_size=32, num_layers=2,
                            num_heads=2),
        wings=WingsConfig(stage="finetune", lora_rank=4, router_max_len=96))
    path = os.path.join(root, "ckpt")
    save_model(path, WingsModel(cfg, Runtime(), rngs=nnx.Rngs(0)), tokenizer_src=tokenizer_dir)
    return path


def cli_mistakes(root: str, demo, ckpt: str) -> list[tuple[str, int, str]]:
    bad_json = os.path.join(root, "bad.jsonl")
    with open(bad_json, "w") as f:
        f.write('{"question": "2+2?", "options": ["4", "5"], "answer": "A"}\n{"question": \n')
    trials = [
        ("train", train_main, ["--config", "configs/nothing.py"]),
        ("train", train_main, ["--config.train.stepz=3"]),
        ("train", train_main, ["--config.train.steps=many"]),
        ("train", train_main, ["--config.optim.groups.llm.lr=-1e-4"]),
        ("train", train_main, ["--config.optim.warmup_ratio=2"]),
        ("train", train_main, ["--config.data.max_len=1000"]),
        ("train", train_main, ["--config.model.wings.mixing=reference", "--config.data.packing=true"]),
        ("train", train_main, ["--topology", "v5p-8"]),
        ("generate", generate_main, ["--ckpt", os.path.join(root, "nowhere"), "--prompt", "hi"]),
        ("generate", generate_main, ["--ckpt", ckpt, "--prompt", "hi", "--max-new-tokens", "500"]),
        ("generate", generate_main, ["--ckpt", ckpt, "--prompt", "hi", "--image", os.path.join(root, "no.png")]),
        ("generate", generate_main, ["--ckpt", ckpt, "--prompt", "hi", "--image",
                                     os.path.join(root, "images", "notes.png")]),
        ("generate", generate_main, ["--ckpt", ckpt, "--prompt", "hi", "--temperature", "-1"]),
        ("evaluate", evaluate_main, ["--ckpt", ckpt, "--data", os.path.join(root, "none.jsonl")]),
        ("evaluate", evaluate_main, ["--ckpt", ckpt, "--data", bad_json]),
        ("convert", convert_main, ["export-wings", "--ckpt", os.path.join(root, "nowhere"), "--out",
                                   os.path.join(root, "out")]),
        ("convert", convert_main, ["export-hf-llm", "--ckpt", ckpt, "--out", demo.image_root]),
        ("data.prepare", prepare_main, ["--input", os.path.join(root, "none.jsonl"), "--output",
                                        os.path.join(root, "x.array_record")]),
        ("data.prepare", prepare_main, ["--input", demo.multimodal_jsonl, "--output", "gs://b/x.array_record"]),
    ]
    rows = []
    for cli, main, argv in trials:
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = main(argv) or 0
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
                if not isinstance(e.code, int):
                    print(e.code, file=sys.stderr)
        lines = [line for line in err.getvalue().splitlines() if line.startswith("error")]
        shown = " ".join(a if root not in a else a.replace(root, "$TMP") for a in argv)
        message = (lines[-1] if lines else err.getvalue().strip().splitlines()[-1]).replace(root, "$TMP")
        rows.append((f"{cli} {shown}", code, message))
    return rows


def main() -> None:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    with tempfile.TemporaryDirectory() as root:
        os.chdir(root)  # the demo config writes runs/demo_data relative to the working directory
        os.makedirs(os.path.join(root, "images"))
        demo = ensure_demo_dataset(os.path.join(root, "demo"), 16)
        tokenizer = load_tokenizer(demo.tokenizer_dir)
        records = record_outcomes(root, tokenizer)
        ckpt = _tiny_checkpoint(root, demo.tokenizer_dir)
        mistakes = cli_mistakes(root, demo, ckpt)
    print("| bad record (among 4 good ones) | bad_record_policy='error' | 'skip' (max_bad_fraction 0.5) |")
    print("|---|---|---|")
    for name, error, skip in records:
        print(f"| {name} | {error} | {skip} |")
    print()
    print("| command | exit | message |")
    print("|---|---|---|")
    for command, code, message in mistakes:
        print(f"| `{command}` | {code} | {message.replace('|', '/')} |")


if __name__ == "__main__":
    main()
