"""Input pipeline throughput: LLaVA-style records with 640x480 JPEGs, decoded, padded and resized to 384.

    python bench/data_throughput.py [--num-records 256] [--batches 24] [--batch-size 8] [--workers 0,1,2]

Writes a temporary data set (JPEG photos of 640x480, one image and a question/answer per record, the local
tokenizer), then for each worker count times whole batches (image_size 384, 729 tokens per image, max_len
2048) after one warm-up batch, and prints examples per second.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time

import numpy as np
from PIL import Image

from wings_jax.data import build_local_qwen_tokenizer, default_data_config, make_data_iterator, source_config


def write_records(out_dir: str, num_records: int, seed: int = 0) -> tuple[str, str]:
    """JPEGs with smooth structure plus noise (compress like photos, about 60-120 kB each)."""
    rng = np.random.default_rng(seed)
    root = os.path.join(out_dir, "images")
    os.makedirs(root, exist_ok=True)
    y, x = np.mgrid[0:480, 0:640].astype(np.float32)
    lines = []
    for i in range(num_records):
        fx, fy, phase = rng.uniform(0.005, 0.05, 2).tolist() + [rng.uniform(0, 6.3)]
        base = 127 + 100 * np.sin(x * fx + y * fy + phase)[..., None] * rng.uniform(0.3, 1.0, 3)
        pixels = np.clip(base + rng.normal(0, 12, (480, 640, 3)), 0, 255).astype(np.uint8)
        name = f"{i:05d}.jpg"
        Image.fromarray(pixels).save(os.path.join(root, name), quality=90)
        question = "<image>\nDescribe the picture in one sentence. What colours and patterns do you see?"
        answer = "The picture shows smooth diagonal stripes of colour with some fine grain. " * 3
        lines.append(json.dumps({"id": str(i), "image": name, "conversations": [
            {"from": "human", "value": question}, {"from": "gpt", "value": answer}]}))
    path = os.path.join(out_dir, "records.jsonl")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    return path, root


def measure(path: str, root: str, tokenizer, workers: int, batches: int, batch_size: int) -> float:
    cfg = default_data_config()
    cfg.sources = [source_config("llava_json", path, image_root=root)]
    cfg.max_len, cfg.max_images, cfg.worker_count = 2048, 1, workers
    it = make_data_iterator(cfg, tokenizer=tokenizer, image_size=384, tokens_per_image=729,
                            global_batch_size=batch_size)
    try:
        next(it)  # start-up (worker processes, first reads) is not throughput
        start = time.perf_counter()
        for _ in range(batches):
            batch = next(it)
        elapsed = time.perf_counter() - start
    finally:
        it.close()
    assert batch["images"].shape == (batch_size, 1, 384, 384, 3)
    return batches * batch_size / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-records", type=int, default=256)
    parser.add_argument("--batches", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", default="0,1,2")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, root = write_records(tmp, args.num_records)
        tokenizer = build_local_qwen_tokenizer(os.path.join(tmp, "tokenizer"))
        print(f"{os.cpu_count()} CPU cores; {args.batches} batches of {args.batch_size} after one warm-up batch")
        for workers in (int(w) for w in args.workers.split(",")):
            rate = measure(path, root, tokenizer, workers, args.batches, args.batch_size)
            print(f"worker_count={workers}: {rate:6.1f} examples/s")


if __name__ == "__main__":
    main()
