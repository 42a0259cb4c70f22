"""What the original Wings recipes (configs/pretrain.py, configs/finetune.py; spec section 6) share: full-size
architectures and data sources from the config argument."""
import ml_collections

from wings_jax.data.pipeline import source_config
from wings_jax.training.run_config import base_config

# Qwen1.5-7B-Chat
QWEN15_7B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 max_position_embeddings=32768)
# SigLIP so400m-patch14-384 with its last encoder layer dropped (Wings' feature layer): 729 tokens per image
SO400M = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
              layer_norm_eps=1e-6)


def full_size_config(stage: str) -> ml_collections.ConfigDict:
    """Qwen1.5-7B-Chat + so400m for ``stage``, 2048-token rows with one image, bf16 compute on fp32 weights, remat
    full; each recipe adds its data, schedule, groups and mesh."""
    c = base_config()
    c.model.llm.update(QWEN15_7B)
    c.model.vision.update(SO400M)
    c.model.wings.update(dict(stage=stage, lora_rank=64, router_max_len=4096))
    c.data.update(dict(max_len=2048, max_images=1, worker_count=8))
    c.runtime.update(dict(dtype="bfloat16", param_dtype="float32", remat="full", attention="xla"))
    return c


def sources_from_arg(arg: str | None, names: tuple[str, ...], weights: dict[str, float]) -> list:
    """``data.sources`` from a config argument such as ``main=gs://b/x.array_record,text=gs://b/t.array_record``.

    ArrayRecord files come from ``python -m wings_jax.data.prepare`` (images embedded); a ``.json`` or
    ``.jsonl`` path is read as LLaVA format with ``image_root=...`` from the same argument.
    """
    if not arg:
        return []
    fields = dict(item.split("=", 1) for item in arg.split(",") if item)
    unknown = set(fields) - set(names) - {"image_root"}
    if unknown:
        raise ValueError(f"config argument names unknown data {sorted(unknown)}; expected {names} and image_root")
    sources = []
    for name in names:
        if name in fields:
            path = fields[name]
            kind = "llava_json" if path.endswith((".json", ".jsonl")) else "array_record"
            sources.append(source_config(kind, path, image_root=fields.get("image_root", ""), weight=weights[name]))
    return sources
