"""The schema of a training run config, with defaults, and the checks run before anything compiles.

Config files (``configs/*.py``) start from :func:`base_config` and change what their run needs.
"""
from __future__ import annotations

import dataclasses
import math

import ml_collections
from ml_collections import config_dict

from wings_jax.config import ConfigError
from wings_jax import checkpoint
from wings_jax.data.checks import check_batch_split, check_image_slots, check_length
from wings_jax.data.pipeline import default_data_config
from wings_jax.model.runtime import DTYPES, Runtime
from wings_jax.model.wings import WingsModelConfig
from wings_jax.params import LEARNERS, LLM_WITHOUT_LEARNERS, PROJECTOR, VISUAL_LEARNER, prefix_pattern

# Parameter groups of the original recipes (spec section 6). Patterns must be disjoint.
PRETRAIN_GROUPS = {
    "projector": {"pattern": prefix_pattern(PROJECTOR), "lr": 2e-5},
    "visual": {"pattern": prefix_pattern(VISUAL_LEARNER), "lr": 2e-5},
}
FINETUNE_GROUPS = {
    "llm": {"pattern": LLM_WITHOUT_LEARNERS, "lr": 2e-6},
    "learners": {"pattern": prefix_pattern(LEARNERS), "lr": 2e-6},
    "projector": {"pattern": prefix_pattern(PROJECTOR), "lr": 1e-5},
}


def base_config() -> ml_collections.ConfigDict:
    c = ml_collections.ConfigDict()
    c.init_from = ""  # converted checkpoint (python -m wings_jax.convert ...) the run starts from
    c.model = ml_collections.ConfigDict({
        # Architecture of a model trained from scratch (demo); with init_from it comes from the checkpoint.
        "llm": ml_collections.ConfigDict(),  # QwenConfig fields
        "vision": ml_collections.ConfigDict(),  # SiglipConfig fields; empty: no vision tower
        "projector": "mlp2x_gelu",
        # Applied on top of init_from's config too (e.g. stage 2 from a stage-1 checkpoint).
        "wings": ml_collections.ConfigDict({
            "enabled": True,  # False: no learners or routers at all (LLaVA-style); learner groups are dropped
            "stage": "finetune", "lora_rank": 64, "router_max_len": 4096, "learner_layers": config_dict.placeholder(tuple),  # None: every layer
            "causal_images": False, "mixing": "corrected",
            # reference mixing only: where text features start; None: init_from's (without init_from: 14)
            "system_prompt_length": config_dict.placeholder(int),
        }),
    })
    # remat "attention" in both stages: it never re-runs attention, and on issue 12's tiny Wings (CPU) it stepped
    # as fast as "none" and "full" with 31% (stage 2) / 22% (stage 1) less planned memory than "none", 8% more than
    # "full" (README, remat row). The full-size recipes keep "full", the policy their slices were planned with.
    # runtime.rows is not a key: it follows data.packing (see runtime())
    c.runtime = ml_collections.ConfigDict(
        {k: v for k, v in dataclasses.asdict(Runtime(dtype="bfloat16", remat="attention")).items() if k != "rows"})
    c.data = default_data_config()
    c.demo_data = ml_collections.ConfigDict({"dir": "", "num_records": 0})  # generate the demo set there
    c.train = ml_collections.ConfigDict({
        "steps": 1000,
        "seed": 0,  # initialisation of a new model (the data order has its own: data.seed)
        "global_batch_size": 64,  # conversations per optimizer step, all hosts together
        "grad_accum": 1,  # micro-batches per step (each global_batch_size // grad_accum rows)
        "loss_chunk": 512,  # positions per vocabulary-projection chunk of the loss
        # > 0: the loss projects only labelled positions, gathered per row into this many slots (a batch
        # with a row of more labelled positions runs all of them); 0: every position
        "loss_positions": 0,
        "loss_logits_dtype": "float32",  # what a loss chunk's logits are stored in (float32 accumulation)
        "log_every": 1,
        "peak_flops": 0.0,  # per-device peak FLOP/s for MFU; 0: from the device kind (wings_jax.flops)
        "profile_steps": (),  # (first, last): write a profiler trace of these steps to WORKDIR/profile
        "wandb_project": "",  # also log to this Weights & Biases project (pip install 'wings_jax[wandb]')
        # held-out multiple-choice accuracy (wings_jax.evaluate) every eval_every steps, at step 0 of a new run
        # and at the end, logged as eval/<name>; eval_data maps names to question JSONL files; 0: off
        "eval_every": 0,
        "eval_data": ml_collections.ConfigDict(),
        "eval_batch_size": 16,
    })
    c.optim = ml_collections.ConfigDict({
        "groups": ml_collections.ConfigDict(FINETUNE_GROUPS),
        "schedule": "cosine",
        "warmup_ratio": 0.03,
        "weight_decay": 0.0,
        "b1": 0.9, "b2": 0.999, "eps": 1e-8,
        "clip_norm": 1.0,
    })
    c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1, "rules": ml_collections.ConfigDict()})
    c.checkpoint = ml_collections.ConfigDict({"every": 500, "keep": 3, "async_save": True})
    return c


def model_config(cfg: ml_collections.ConfigDict) -> WingsModelConfig:
    """The model to train.

    ``model.llm`` / ``model.vision`` describe the architecture (needed to plan or compile a run
    without its weights at hand); ``init_from`` supplies weights and must agree with them. Without
    ``model.llm`` the architecture comes from ``init_from`` (a shape setting that would be ignored is
    refused). ``model.wings`` settings that do not change parameter shapes (stage, mixing,
    causal_images, system_prompt_length when set) apply on top of ``init_from``'s config.
    """
    try:
        model = cfg.model.to_dict()
        if model["wings"]["system_prompt_length"] is None:  # WingsConfig's default, or init_from's below
            del model["wings"]["system_prompt_length"]
        described = WingsModelConfig.from_dict(model) if cfg.model.llm else None
        if not cfg.init_from:
            if described is None:
                raise ConfigError("set init_from (a converted checkpoint or training workdir) or describe model.llm")
            return described
        base, _ = checkpoint.read_config(cfg.init_from)
        if described is None:
            _refuse_unapplied(cfg, base)
        behaviour = {k: cfg.model.wings[k] for k in ("stage", "mixing", "causal_images", "system_prompt_length")
                     if cfg.model.wings[k] is not None}
        from_checkpoint = dataclasses.replace(base, wings=dataclasses.replace(base.wings, **behaviour))
        if described is not None and dataclasses.replace(described, wings=dataclasses.replace(
                described.wings, system_prompt_length=from_checkpoint.wings.system_prompt_length)) != from_checkpoint:
            raise ConfigError(
                f"the model described by the config differs from init_from {cfg.init_from}:\n"
                f"  config:     {described}\n  checkpoint: {from_checkpoint}\n"
                "fix model.* or point init_from at the matching checkpoint")
        return from_checkpoint
    except (TypeError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        raise ConfigError(f"model config: {e}") from None


def _refuse_unapplied(cfg: ml_collections.ConfigDict, base: WingsModelConfig) -> None:
    """With ``init_from`` and no ``model.llm``, the architecture is the checkpoint's: a shape setting that was
    changed from its default and differs from the checkpoint's would be ignored, so it is refused by name."""
    defaults = base_config().model
    asked = {f"model.vision.{k}": (v, getattr(base.vision, k, None)) for k, v in cfg.model.vision.items()}
    asked["model.projector"] = (cfg.model.projector, base.projector) if cfg.model.projector != defaults.projector \
        else (None, None)
    for key in ("enabled", "lora_rank", "router_max_len", "learner_layers"):
        value = cfg.model.wings[key]
        if value != defaults.wings[key]:
            asked[f"model.wings.{key}"] = (tuple(value) if key == "learner_layers" else value,
                                           getattr(base.wings, key))
    ignored = [f"{k}={v!r} (init_from has {has!r})" for k, (v, has) in asked.items() if v != has]
    if ignored:
        raise ConfigError(f"with init_from={cfg.init_from} and model.llm empty the architecture is init_from's, so "
                          f"{', '.join(ignored)} would be ignored; remove them, or describe the whole model "
                          "(model.llm too)")


def optim_settings(cfg: ml_collections.ConfigDict, model: WingsModelConfig) -> dict:
    """``cfg.optim`` for this model: one without the Wings branch drops the groups of learner parameters
    (so any recipe trains a LLaVA-style model: stage 1 the projector, stage 2 the LLM and projector)."""
    optim = cfg.optim.to_dict()
    if not model.wings.enabled:
        learners = prefix_pattern(LEARNERS)
        optim["groups"] = {n: g for n, g in optim["groups"].items() if not g["pattern"].startswith(learners)}
    return optim


def runtime(cfg: ml_collections.ConfigDict) -> Runtime:
    """The model's runtime: ``cfg.runtime``, and rows packed or padded as the data pipeline makes them (so
    the cudnn / dot_product attentions take their masks as structure on unpacked data)."""
    try:
        return Runtime(**cfg.runtime, rows="packed" if cfg.data.packing else "padded")
    except (TypeError, ValueError) as e:
        raise ConfigError(f"runtime config: {e}") from None


def check_run(cfg: ml_collections.ConfigDict, model: WingsModelConfig, batch_shards: int, process_count: int) -> None:
    """Batch sizes and lengths that cannot work are refused with the numbers at fault (the data's sources are
    not needed to plan a step: :func:`check_sources` is training's)."""
    t = cfg.train
    b, accum = t.global_batch_size, t.grad_accum
    if b <= 0 or accum <= 0 or t.steps <= 0:
        raise ConfigError("train.global_batch_size, train.grad_accum and train.steps must be positive")
    check_batch_split(b, process_count, ConfigError)
    if b % (batch_shards * accum):
        raise ConfigError(
            f"train.global_batch_size={b} must be a multiple of (data x fsdp = {batch_shards}) x "
            f"(train.grad_accum = {accum}) = {batch_shards * accum}: each micro-batch is split over the batch axes")
    max_len = cfg.data.max_len
    wings = model.wings
    check_length(model, max_len, "data.max_len", "raise model.wings.router_max_len or lower data.max_len",
                 ConfigError)
    if max_len % min(t.loss_chunk, max_len):
        raise ConfigError(f"data.max_len={max_len} is not a multiple of train.loss_chunk={t.loss_chunk}")
    if not 0 <= t.loss_positions <= max_len or (t.loss_positions and t.loss_positions % min(t.loss_chunk,
                                                                                           t.loss_positions)):
        raise ConfigError(f"train.loss_positions={t.loss_positions} must be 0 (every position) or at most "
                          f"data.max_len={max_len} and a multiple of train.loss_chunk={t.loss_chunk} (or below it)")
    if t.loss_logits_dtype not in DTYPES:
        raise ConfigError(f"train.loss_logits_dtype={t.loss_logits_dtype!r}; choose one of {sorted(DTYPES)}")
    if t.profile_steps and (len(t.profile_steps) != 2 or not 0 <= t.profile_steps[0] <= t.profile_steps[1] < t.steps):
        raise ConfigError(f"train.profile_steps={t.profile_steps!r} must be (first, last) with 0 <= first <= last "
                          f"< train.steps={t.steps}")
    check_optim(cfg.optim)
    if wings.mixing == "reference" and (cfg.data.packing or cfg.data.max_images > 1):
        raise ConfigError(f"model.wings.mixing='reference' handles one unpacked conversation with at most one image "
                          f"per row, as the released code does (data.packing={cfg.data.packing}, data.max_images="
                          f"{cfg.data.max_images}); set data.packing=False and data.max_images=1, or use "
                          "mixing='corrected'")
    if t.eval_every < 0 or t.eval_batch_size <= 0 or (t.eval_every and not t.eval_data):
        raise ConfigError(f"train.eval_every={t.eval_every} needs train.eval_data (name -> questions JSONL) and "
                          f"a positive train.eval_batch_size (is {t.eval_batch_size}); eval_every=0 turns it off")
    if t.eval_every and process_count > 1:
        raise ConfigError("train.eval_every runs on one process only for now; set it to 0 for multi-host runs")
    check_image_slots(cfg.data.max_images, max_len, model.tokens_per_image, ConfigError)


def check_sources(cfg: ml_collections.ConfigDict) -> None:
    """A run that trains needs data to read (compile-only planning does not)."""
    if not cfg.data.sources and not cfg.demo_data.dir:
        raise ConfigError("data.sources is empty; name the training data (see the config file's docstring)")


def check_optim(optim: ml_collections.ConfigDict) -> None:
    """Optimizer settings no run can train with are refused by name (``clip_norm=0`` means no clipping)."""
    ranges = {  # key: (test, what it must be)
        "warmup_ratio": (lambda v: 0 <= v <= 1, "in [0, 1]"),
        "b1": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "b2": (lambda v: 0 <= v < 1, "in [0, 1)"),
        "eps": (lambda v: v > 0, "positive"),
        "weight_decay": (lambda v: v >= 0, "zero or positive"),
        "clip_norm": (lambda v: v >= 0, "zero (no clipping) or positive"),
    }
    settings = {f"optim.{k}": (optim[k], *rule) for k, rule in ranges.items()}
    for name, group in optim.groups.items():
        settings[f"optim.groups.{name}.lr"] = (group.get("lr"), lambda v: v >= 0, "zero or positive")
    for key, (value, ok, must) in settings.items():
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or not ok(value):
            raise ConfigError(f"{key}={value!r} must be a finite number {must}")
