"""Text-only forgetting, Wings against a LLaVA-style baseline, on synthetic data in minutes on a CPU.

    python -m wings_jax.experiments.forgetting --out DIR [--seeds N] [--quick] [--text-fraction F ...]

Phases (every one is ``wings_jax.training.loop.train`` on LLaVA JSONL + PNG files through the real pipeline,
image preprocessing and a SigLIP tower; accuracies are ``wings_jax.evaluate`` option log-likelihoods on
held-out items, logged by ``train.eval_every``):
  1. a tiny Qwen2 learns four text-only skills from scratch (once; the random tower stays frozen throughout);
  2. per seed and arm, the text model gets a fresh projector (and, for ``wings``, fresh learners), then
     stage 1 (``wings``: projector + visual learners; ``llava``: projector; LLM frozen) on image descriptions,
     and stage 2 (``wings``: learners, routers, projector, LLM; ``llava``: projector, LLM) on image
     questions with a fraction of text-only records. ``llava`` is the model without a Wings branch
     (``wings.enabled=False``). Both arms see the same data and steps.
Measured per arm and seed: text accuracy before and after stage 2, image-question accuracy after, and the
attention shift: the share of the main attention that text after the image gives to the text before it and
to the image tokens (``WingsModel.attention_mass``), after stage 1 and after stage 2.

Writes DIR/results.json, DIR/text_accuracy.png, the runs' workdirs, and prints a table.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from tqdm import tqdm

from wings_jax.checkpoint import read_config, save_model
from wings_jax.data.conversation import Turn
from wings_jax.data.pipeline import source_config
from wings_jax.experiments.synthetic import Files, make_data
from wings_jax.inference import bucket_length, encode_chat, load_for_inference, pad_prompts, with_continuation
from wings_jax.model.inputs import IMAGE_TOKEN_ID
from wings_jax.model.wings import WingsModel
from wings_jax.multiple_choice import read_questions
from wings_jax.params import LLM as LLM_PARAMS, PROJECTOR, flat_values, materialize, prefix_pattern
from wings_jax.sharding import make_mesh
from wings_jax.training.loop import train
from wings_jax.training.run_config import FINETUNE_GROUPS, PRETRAIN_GROUPS, base_config

ARMS = ("wings", "llava")
LLM = dict(vocab_size=512, hidden_size=128, intermediate_size=256, num_layers=2, num_heads=4, num_kv_heads=2,
           rope_theta=10_000.0, max_position_embeddings=256)
VISION = dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=2)


@dataclasses.dataclass(frozen=True)
class Settings:
    """Sizes and learning rates of one experiment (``--quick`` only shrinks the sizes)."""

    text_records: int = 8000
    image_records: int = 1500
    heldout: int = 64
    text_steps: int = 500
    text_batch: int = 32
    text_lr: float = 3e-3
    stage1_steps: int = 40
    stage1_lr: float = 3e-3  # projector and visual learners (the projector keeps it in stage 2)
    stage2_steps: int = 100
    stage2_lr: float = 5e-4  # LLM and learners: equal rates, as in the recipe ...
    learner_lr: float = 0.0  # ... unless set here (stage-2 rate of the learners and routers)
    eval_every: int = 25
    batch: int = 16
    max_len: int = 64
    lora_rank: int = 8

    @classmethod
    def quick(cls) -> "Settings":
        return cls(text_records=400, image_records=96, heldout=16, text_steps=30, stage1_steps=4, stage2_steps=8,
                   eval_every=4)


# ---------------------------------------------------------------------------------------------
# run configs


def _config(files: Files, s: Settings, *, steps: int, groups: dict, sources: list, seed: int,
            eval_every: int = 0) -> ml_collections.ConfigDict:
    c = base_config()
    c.runtime.update(dict(dtype="float32", remat="none"))
    c.data.update(dict(sources=sources, tokenizer=files.tokenizer, max_len=s.max_len, max_images=1, seed=seed))
    c.train.update(dict(steps=steps, global_batch_size=s.batch, loss_chunk=s.max_len, log_every=10, seed=seed,
                        eval_every=eval_every, eval_batch_size=32))
    if eval_every:
        c.train.eval_data = {"text": files.text_heldout, "mm": files.mm_heldout}
    c.optim.groups = groups
    c.optim.warmup_ratio = 0.05
    c.mesh.data = 1  # one device: the figures do not depend on the machine's device count
    c.checkpoint.update(dict(every=steps, keep=1))
    return c


def _text_config(files: Files, s: Settings) -> ml_collections.ConfigDict:
    """Phase 1: the language model alone learns the text skills (the model has no Wings branch yet)."""
    groups = {"llm": {"pattern": prefix_pattern(LLM_PARAMS), "lr": s.text_lr}}
    c = _config(files, s, steps=s.text_steps, groups=groups,
                sources=[source_config("llava_json", files.text_train)], seed=0)
    c.train.global_batch_size = s.text_batch
    c.model.llm.update(LLM)
    c.model.vision.update(VISION)
    c.model.wings.update(dict(enabled=False, router_max_len=128))
    c.data.max_images = 0  # text-only rows: no image slots, the tower never runs
    c.train.eval_every = s.text_steps  # step 0 and the end
    c.train.eval_data = {"text": files.text_heldout}
    return c


def _stage_config(files: Files, s: Settings, arm: str, stage: int, init_from: str, seed: int,
                  text_fraction: float = 0.0) -> ml_collections.ConfigDict:
    images = files.images
    if stage == 1:
        groups = {name: dict(g, lr=s.stage1_lr) for name, g in PRETRAIN_GROUPS.items()}
        sources = [source_config("llava_json", files.captions, image_root=images)]
        c = _config(files, s, steps=s.stage1_steps, groups=groups, sources=sources, seed=seed)
    else:
        rates = {"projector": s.stage1_lr, "llm": s.stage2_lr, "learners": s.learner_lr or s.stage2_lr}
        groups = {name: dict(g, lr=rates[name]) for name, g in FINETUNE_GROUPS.items()}
        sources = [source_config("llava_json", files.questions, image_root=images, weight=1.0 - text_fraction)]
        if text_fraction > 0:
            sources.append(source_config("llava_json", files.text_train, weight=text_fraction))
        c = _config(files, s, steps=s.stage2_steps, groups=groups, sources=sources, seed=seed,
                    eval_every=s.eval_every)
    # the llava arm's model has no learners: run_config drops their groups, so it trains the rest
    c.init_from = init_from
    c.model.wings.stage = "pretrain" if stage == 1 else "finetune"
    return c


def _arm_start(text_run: str, out: str, arm: str, seed: int, s: Settings) -> str:
    """The text model with a fresh projector (and fresh learners for ``wings``), as a converted checkpoint:
    the learners start at exactly zero output, so both arms start from the same function."""
    base, _ = read_config(text_run)
    wings = dataclasses.replace(base.wings, enabled=arm == "wings", stage="pretrain", lora_rank=s.lora_rank)
    cfg = dataclasses.replace(base, wings=wings)
    text_model, _ = load_for_inference(text_run)
    kept = {k: v for k, v in flat_values(nnx.state(text_model, nnx.Param)).items() if not k.startswith(PROJECTOR)}
    model = materialize(lambda rngs: WingsModel(cfg, text_model.rt, rngs=rngs), kept, seed=seed)
    save_model(out, model, tokenizer_src=text_run, metadata={"source": "forgetting experiment", "arm": arm})
    return out


# ---------------------------------------------------------------------------------------------
# measures


def _eval_curve(workdir: str) -> list[dict[str, float]]:
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    return [{"step": r["step"], "text": r["eval/text"], "mm": r.get("eval/mm")} for r in records if "eval/text" in r]


@functools.partial(jax.jit, static_argnames="graphdef")
def _mass(state, graphdef, batch, groups):
    return nnx.merge(graphdef, state).attention_mass(batch, groups)


def attention_shift(workdir: str, probe_file: str) -> dict[str, Any]:
    """Share of the main attention (mean over heads, post-image text queries and probe items) that goes to
    the text before the image and to the image tokens, per layer and averaged over layers."""
    model, tokenizer = load_for_inference(workdir)
    prompts = []
    for q in read_questions(probe_file):
        prompt = encode_chat(model.cfg, tokenizer, [Turn("user", q.question)], [q.image])
        answer = np.asarray(tokenizer(q.options[q.answer], add_special_tokens=False)["input_ids"], np.int32)
        prompts.append(with_continuation(prompt, answer))
    batch = pad_prompts(prompts, bucket_length(max(len(p.tokens) for p in prompts)))
    valid, image = batch["segment_ids"] > 0, batch["tokens"] == IMAGE_TOKEN_ID
    seen_image = np.cumsum(image, axis=1) > 0
    before = valid & ~image & ~seen_image
    after = valid & ~image & seen_image  # post-image text: the queries
    groups = np.stack([before, image], axis=-1).astype(np.float32)
    graphdef, state = nnx.split(model)
    mass = np.asarray(_mass(state, graphdef, {k: jnp.asarray(v) for k, v in batch.items()}, jnp.asarray(groups)))
    share = mass[:, after] / model.cfg.llm.num_heads  # (layers, queries, 2)
    per_layer = share.mean(axis=1)
    return {"pre_text": float(per_layer[:, 0].mean()), "image": float(per_layer[:, 1].mean()),
            "per_layer": {"pre_text": per_layer[:, 0].tolist(), "image": per_layer[:, 1].tolist()}}


# ---------------------------------------------------------------------------------------------
# the experiment


def _train(cfg: ml_collections.ConfigDict, workdir: str) -> None:
    cfg.lock()
    if not os.path.exists(os.path.join(workdir, "checkpoints", str(cfg.train.steps))):
        train(cfg, workdir, mesh=make_mesh(1, 1, 1, devices=jax.devices()[:1]))


def run(out: str, seeds: int = 3, text_fractions: Sequence[float] = (0.0, 0.1), quick: bool = False,
        **changes: Any) -> dict:
    """Runs the whole experiment under ``out`` (finished runs there are reused) and returns its results;
    ``changes`` replace :class:`Settings` fields (e.g. ``stage2_lr``)."""
    start = time.perf_counter()
    s = dataclasses.replace(Settings.quick() if quick else Settings(), **changes)
    out = os.path.abspath(out)
    _claim(out, s)
    files = make_data(os.path.join(out, "data"), text_records=s.text_records, image_records=s.image_records,
                      heldout=s.heldout)
    text_run = os.path.join(out, "text_model")
    _train(_text_config(files, s), text_run)
    text_curve = _eval_curve(text_run)

    runs = [(seed, arm) for seed in range(seeds) for arm in ARMS]
    per_seed: dict[tuple[float, str], list[dict]] = {(f, arm): [] for f in text_fractions for arm in ARMS}
    curves: dict[tuple[float, str], list[list[dict]]] = {(f, arm): [] for f in text_fractions for arm in ARMS}
    with tqdm(total=len(runs) * (1 + len(text_fractions)), desc="forgetting runs", unit="run",
              file=sys.stderr) as bar:
        for seed, arm in runs:
            root = os.path.join(out, f"seed{seed}", arm)
            init = os.path.join(root, "start")
            if not os.path.exists(init):
                _arm_start(text_run, init, arm, seed, s)
            stage1 = os.path.join(root, "stage1")
            _train(_stage_config(files, s, arm, 1, init, seed), stage1)
            bar.update()
            shift_before = attention_shift(stage1, files.probe)
            for fraction in text_fractions:
                stage2 = os.path.join(root, f"stage2_text{fraction:g}")
                _train(_stage_config(files, s, arm, 2, stage1, seed, fraction), stage2)
                curve = _eval_curve(stage2)
                per_seed[fraction, arm].append({
                    "seed": seed, "text_before": curve[0]["text"], "text_after": curve[-1]["text"],
                    "mm_before": curve[0]["mm"], "mm_after": curve[-1]["mm"],
                    "attention": {"before": shift_before, "after": attention_shift(stage2, files.probe)}})
                curves[fraction, arm].append(curve)
                bar.update()

    def arms(fraction: float) -> dict:
        return {arm: summarise(per_seed[fraction, arm]) for arm in ARMS}

    results = {
        "arms": arms(text_fractions[0]),
        "text_fraction": text_fractions[0],
        "other_text_fractions": {f"{f:g}": {"arms": arms(f)} for f in text_fractions[1:]},
        "text_model": {"steps": s.text_steps, "text_accuracy": text_curve[-1]["text"],
                       "reached_0.9": text_curve[-1]["text"] >= 0.9},
        "curves": {f"{f:g}": {arm: curves[f, arm] for arm in ARMS} for f in text_fractions},
        "settings": {**dataclasses.asdict(s), "seeds": seeds, "text_fractions": list(text_fractions),
                     "quick": quick, "llm": LLM, "vision": VISION},
        "wall_time_s": time.perf_counter() - start,
    }
    with open(os.path.join(out, "results.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    plot(results, os.path.join(out, "text_accuracy.png"))
    return results


def _claim(out: str, s: Settings) -> None:
    """Finished runs under ``out`` are reused, so ``out`` must belong to these settings."""
    path = os.path.join(out, "settings.json")
    wanted = dataclasses.asdict(s)
    if os.path.exists(path):
        with open(path, encoding="utf-8") as f:
            if json.load(f) != wanted:
                raise ValueError(f"{out} holds runs of other settings ({path}); choose a new --out")
        return
    os.makedirs(out, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(wanted, f, indent=2)


MEASURES = ("text_before", "text_after", "mm_after")


def summarise(seeds: list[dict]) -> dict:
    """Means over seeds, their spread (standard deviation), and the per-seed values."""
    out: dict[str, Any] = {k: float(np.mean([r[k] for r in seeds])) for k in MEASURES}
    out["spread"] = {k: float(np.std([r[k] for r in seeds])) for k in MEASURES}
    out["attention"] = {when: {group: float(np.mean([r["attention"][when][group] for r in seeds]))
                               for group in ("pre_text", "image")} for when in ("before", "after")}
    out["seeds"] = seeds
    return out


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fractions = list(results["curves"])
    fig, axes = plt.subplots(1, len(fractions), figsize=(5 * len(fractions), 3.6), squeeze=False, sharey=True)
    for ax, fraction in zip(axes[0], fractions):
        for arm, colour in zip(ARMS, ("tab:blue", "tab:red")):
            runs = results["curves"][fraction][arm]
            steps = [p["step"] for p in runs[0]]
            for key, style in (("text", "-"), ("mm", ":")):
                values = np.array([[p[key] for p in curve] for curve in runs])
                ax.plot(steps, values.mean(0), style, color=colour, label=f"{arm} {key}")
                if len(runs) > 1:
                    ax.fill_between(steps, values.min(0), values.max(0), color=colour, alpha=0.15, linewidth=0)
        ax.set_title(f"stage 2, text-only fraction {fraction}")
        ax.set_xlabel("stage-2 step")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("held-out accuracy (text: solid, image: dotted)")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(results: dict) -> str:
    rows = [("text frac", "arm", "text before", "text after", "image after", "attn pre-text", "attn image")]
    blocks = [(results["text_fraction"], results["arms"])]
    blocks += [(float(f), b["arms"]) for f, b in results["other_text_fractions"].items()]
    for fraction, arms in blocks:
        for arm in ARMS:
            r, sd, a = arms[arm], arms[arm]["spread"], arms[arm]["attention"]
            rows.append((f"{fraction:g}", arm, *(f"{r[k]:.3f} ± {sd[k]:.3f}" for k in MEASURES),
                         f"{a['before']['pre_text']:.3f} -> {a['after']['pre_text']:.3f}",
                         f"{a['before']['image']:.3f} -> {a['after']['image']:.3f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows]
    return "\n".join([lines[0], "  ".join("-" * w for w in widths), *lines[1:]])


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m wings_jax.experiments.forgetting", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory (finished runs in it are reused)")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline in about a minute")
    parser.add_argument("--text-fraction", type=float, nargs="+", default=[0.0, 0.1],
                        help="share of text-only records in stage 2 (the first is the headline 'arms')")
    parser.add_argument("--stage2-lr", type=float, help=f"LLM and learner rate of stage 2 "
                                                        f"(default {Settings.stage2_lr})")
    parser.add_argument("--learner-lr", type=float, help="stage-2 rate of the learners (default: --stage2-lr)")
    parser.add_argument("--lora-rank", type=int, help=f"learner rank (default {Settings.lora_rank})")
    args = parser.parse_args(argv)
    if args.seeds < 1 or any(not 0 <= f < 1 for f in args.text_fraction):
        parser.error("--seeds must be >= 1 and every --text-fraction in [0, 1)")
    # every run compiles the same steps: keep them (JAX_COMPILATION_CACHE_DIR, else under --out)
    cache = os.environ.get("JAX_COMPILATION_CACHE_DIR") or os.path.join(os.path.abspath(args.out), "jax_cache")
    jax.config.update("jax_compilation_cache_dir", cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    changes = {k: getattr(args, k) for k in ("stage2_lr", "learner_lr", "lora_rank") if getattr(args, k) is not None}
    try:
        results = run(args.out, args.seeds, args.text_fraction, args.quick, **changes)
    except ValueError as e:  # the package's errors name the file or setting at fault
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table(results))
    print(f"text model: {results['text_model']['text_accuracy']:.3f} held-out text accuracy after "
          f"{results['text_model']['steps']} steps; wall time {results['wall_time_s']:.0f} s; "
          f"results in {os.path.join(args.out, 'results.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
