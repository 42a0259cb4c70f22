"""Full-size architectures and data options shared by the original Wings recipes (spec section 6)."""
from wings_jax.data.pipeline import source_config

# Qwen1.5-7B-Chat
QWEN15_7B = dict(vocab_size=151936, hidden_size=4096, intermediate_size=11008, num_layers=32, num_heads=32,
                 num_kv_heads=32, rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 max_position_embeddings=32768)
# SigLIP so400m-patch14-384 with its last encoder layer dropped (Wings' feature layer): 729 tokens per image
SO400M = dict(image_size=384, patch_size=14, hidden_size=1152, intermediate_size=4304, num_layers=26, num_heads=16,
              layer_norm_eps=1e-6)


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
