"""Weight conversion command line.

    python -m wings_jax.convert import-hf --llm QWEN_DIR [--vision SIGLIP_DIR] --out CKPT [--stage finetune] [--no-wings]
    python -m wings_jax.convert import-wings --src RELEASED_DIR --out CKPT [--mixing reference|corrected]
    python -m wings_jax.convert export-wings --ckpt CKPT --out DIR [--dtype source|float32|bfloat16]
    python -m wings_jax.convert export-hf-llm --ckpt CKPT --out DIR [--dtype ...]
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence

from wings_jax.checkpoint import load_model, save_model
from wings_jax.convert.hf_io import ConversionError
from wings_jax.convert.wings_params import build_from_hf, export_hf_llm, export_wings, import_wings
from wings_jax.data.tokenizer import copy_tokenizer_files
from wings_jax.model.learners import MIXINGS, STAGES, WingsConfig
from wings_jax.model.runtime import Runtime

DTYPE_CHOICES = ("source", "float32", "bfloat16", "float16")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m wings_jax.convert", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("import-hf", help="fresh Wings model from Hugging Face Qwen2 (+ SigLIP) directories")
    p.add_argument("--llm", required=True, help="Qwen2 directory (config.json, safetensors, tokenizer)")
    p.add_argument("--vision", help="SigLIP directory (SiglipVisionModel or SiglipModel)")
    p.add_argument("--out", required=True)
    p.add_argument("--stage", choices=STAGES, default="pretrain")
    p.add_argument("--no-wings", action="store_true",
                   help="no learners or routers: a LLaVA-style model (wings.enabled=False)")
    p.add_argument("--lora-rank", type=int, default=64)
    p.add_argument("--learner-layers", type=int, nargs="*", help="default: every layer")
    p.add_argument("--router-max-len", type=int, default=4096)
    p.add_argument("--projector", choices=("mlp2x_gelu", "linear"), default="mlp2x_gelu")
    p.add_argument("--select-layer", type=int, default=-2, help="vision feature layer (-2: drop the last layer)")
    p.add_argument("--causal-images", action="store_true")
    p.add_argument("--param-dtype", choices=DTYPE_CHOICES[1:], default="float32")
    p.add_argument("--seed", type=int, default=0, help="initialisation of the learners and projector")

    p = sub.add_parser("import-wings", help="the released original Wings checkpoint")
    p.add_argument("--src", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--mixing", choices=MIXINGS, default="reference",
                   help="reference: the behaviour the weights were trained with (default)")
    p.add_argument("--param-dtype", choices=DTYPE_CHOICES[1:], default="float32")
    p.add_argument("--vision-heads", type=int, help="only for a tower whose configuration is not known")
    p.add_argument("--vision-eps", type=float, help="only for a tower whose configuration is not known")
    p.add_argument("--vision-image-size", type=int, help="only for a tower whose configuration is not known")

    for name, help_text in (("export-wings", "write the released original layout"),
                            ("export-hf-llm", "write the language model as a transformers Qwen2 directory")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--ckpt", required=True, help="converted checkpoint or training workdir")
        p.add_argument("--out", required=True)
        p.add_argument("--dtype", choices=DTYPE_CHOICES, default="source",
                       help="tensor dtype; 'source' = the dtype the weights were imported from")
    return parser


def _refuse_existing(out: str) -> None:
    if os.path.exists(out) and os.listdir(out):
        raise ConversionError(f"{out}: exists and is not empty; choose a new output directory")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        _refuse_existing(args.out)
        if args.command == "import-hf":
            wings = WingsConfig(enabled=not args.no_wings, stage=args.stage, lora_rank=args.lora_rank, router_max_len=args.router_max_len,
                                learner_layers=tuple(args.learner_layers) if args.learner_layers else None,
                                causal_images=args.causal_images)
            model, meta = build_from_hf(args.llm, args.vision, wings, Runtime(param_dtype=args.param_dtype),
                                        projector=args.projector, select_layer=args.select_layer, seed=args.seed)
            save_model(args.out, model, tokenizer_src=args.llm, metadata=meta)
        elif args.command == "import-wings":
            known = {"num_heads": args.vision_heads, "layer_norm_eps": args.vision_eps,
                     "image_size": args.vision_image_size}
            model, meta = import_wings(args.src, Runtime(param_dtype=args.param_dtype), mixing=args.mixing,
                                       vision_known=known)
            save_model(args.out, model, tokenizer_src=args.src, metadata=meta)
        else:
            model, meta = load_model(args.ckpt)
            dtype = meta.get("source_dtype", "float32") if args.dtype == "source" else args.dtype
            if args.command == "export-wings":
                export_wings(model, args.out, dtype, meta)
            else:
                export_hf_llm(model, args.out, dtype)
            copy_tokenizer_files(args.ckpt, args.out)
    except (ConversionError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
