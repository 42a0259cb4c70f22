"""Training entry point.

    python -m wings_jax.train [--config configs/demo.py] [--config.key=value ...] [--workdir DIR]
        [--distributed | --coordinator_address HOST:PORT --num_processes N --process_id I]

Without ``--config`` it runs the built-in tiny demo (configs/demo.py) on whatever devices are present.
A run resumes from the newest complete checkpoint in its workdir; ``init_from`` starts a new run from
a converted checkpoint. SIGTERM / SIGINT save a checkpoint and exit (pre-emption).
"""
from __future__ import annotations

from wings_jax.training.preemption import PreemptionGuard

# Run as a program, the guard is installed before the heavy imports below (several seconds): a SIGTERM
# during start-up then ends the run as one during training does (exit 143, nothing half-written).
_STARTUP_GUARD = PreemptionGuard() if __name__ == "__main__" else None

import argparse  # noqa: E402 - after the guard
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath
from flax import nnx
from jax.experimental import multihost_utils

from wings_jax import distributed, sharding
from wings_jax.config import ConfigError, parse_command_line
from wings_jax.convert import checkpoint
from wings_jax.convert.hf_io import copy_tokenizer_files
from wings_jax.data.batch import BatchSpec
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.data.pipeline import make_data_iterator
from wings_jax.data.tokenizer import load_tokenizer
from wings_jax.evaluate import Question, evaluate, read_questions
from wings_jax.flops import count_flops, peak_flops_per_device
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import abstract_model, flat_variables, flatten_dict, unflatten_dict
from wings_jax.training import run_config
from wings_jax.training.checkpointing import CheckpointError, Checkpointer
from wings_jax.training.metrics import LEARNING_RATE_PREFIX, MetricsWriter
from wings_jax.training.optimizer import assign_groups, make_optimizer, trainable_filter
from wings_jax.training.step import make_train_step

log = logging.getLogger("wings_jax.train")
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "demo.py")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says what was kept."""


@dataclasses.dataclass
class Plan:
    """Everything about a run that does not need parameter values: enough to compile its step."""

    cfg: ml_collections.ConfigDict
    model_cfg: WingsModelConfig
    mesh: jax.sharding.Mesh
    make_model: Any
    owner: dict[str, str]
    tx: Any
    abstract_trainable: Any  # pure pytrees of ShapeDtypeStruct carrying their shardings
    abstract_frozen: Any
    abstract_opt_state: Any
    batch_shapes: dict[str, jax.ShapeDtypeStruct]
    step_fn: Any  # jitted
    flops_per_step: float


def _with_shardings(abstract: Any, shardings: Any) -> Any:
    return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings)


def split_params(full: dict, owner: dict[str, str]) -> tuple[dict, dict]:
    """Splits a pure params dict into (trainable, frozen) by path."""
    flat = flatten_dict(full)
    return (unflatten_dict({p: v for p, v in flat.items() if p in owner}),
            unflatten_dict({p: v for p, v in flat.items() if p not in owner}))


def merge_params(trainable: dict, frozen: dict) -> dict:
    return unflatten_dict({**flatten_dict(trainable), **flatten_dict(frozen)})


def plan(cfg: ml_collections.ConfigDict, mesh: jax.sharding.Mesh, process_count: int = 1) -> Plan:
    """Checks the config against the mesh and builds the (not yet compiled) sharded train step."""
    model_cfg = run_config.model_config(cfg)
    rt = run_config.runtime(cfg)
    batch_shards = mesh.shape["data"] * mesh.shape["fsdp"]
    run_config.check_run(cfg, model_cfg, batch_shards, process_count)
    rules = sharding.rules_from_config(cfg.mesh.rules.to_dict())

    def make_model(rngs):
        return WingsModel(model_cfg, rt, rngs=rngs)

    abstract = abstract_model(make_model)
    optim = run_config.optim_settings(cfg, model_cfg)
    owner = assign_groups(list(flat_variables(nnx.state(abstract, nnx.Param))), optim["groups"])
    graphdef, trainable_state, frozen_state = nnx.split(abstract, trainable_filter(owner), ...)
    trainable_sh = sharding.state_shardings(trainable_state, mesh, rules)
    frozen_sh = sharding.state_shardings(frozen_state, mesh, rules)
    abstract_trainable = _with_shardings(trainable_state.to_pure_dict(), trainable_sh)
    abstract_frozen = _with_shardings(frozen_state.to_pure_dict(), frozen_sh)

    tx, schedules = make_optimizer(abstract_trainable, owner, optim, cfg.train.steps)
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    opt_shapes = jax.eval_shape(tx.init, abstract_trainable)
    opt_sh = _opt_state_shardings(opt_shapes, trainable_sh, replicated)
    abstract_opt = _with_shardings(opt_shapes, opt_sh)

    b, d = cfg.train.global_batch_size, cfg.data
    image = model_cfg.vision.image_size if model_cfg.vision else 0
    batch_shapes = {k: jax.ShapeDtypeStruct(s, t, sharding=sharding.batch_sharding(mesh, len(s), rules))
                    for k, (s, t) in BatchSpec(b, d.max_len, d.max_images, image).shapes().items()}

    step = make_train_step(graphdef, tx, schedules, grad_accum=cfg.train.grad_accum,
                           loss_chunk=cfg.train.loss_chunk, mesh=mesh, rules=rules)
    step_fn = jax.jit(
        step,
        in_shardings=(trainable_sh, frozen_sh, opt_sh, replicated, {k: v.sharding for k, v in batch_shapes.items()}),
        out_shardings=(trainable_sh, opt_sh, replicated),
        donate_argnums=(0, 2),
    )
    components = {"llm" if not p.startswith(("projector/", "llm/layers/side/")) else
                  ("projector" if p.startswith("projector/") else "learners") for p in owner}
    flops = count_flops(model_cfg, batch=b, seq_len=d.max_len, images_per_row=d.max_images,
                        trainable=components).training_total
    return Plan(cfg, model_cfg, mesh, make_model, owner, tx, abstract_trainable, abstract_frozen,
                abstract_opt, batch_shapes, step_fn, flops)


def _opt_state_shardings(opt_shapes: Any, param_shardings: dict, replicated) -> Any:
    """Optimizer moments live where their parameters do; everything else (step counts) is replicated.

    A moment leaf ends its key path with its parameter's dict keys (optax mirrors the parameter tree).
    """
    flat = flatten_dict(param_shardings)

    def place(path, leaf):
        keys = []
        for entry in reversed(path):
            if not isinstance(entry, jax.tree_util.DictKey):
                break
            keys.insert(0, str(entry.key))
        sharding_ = flat.get("/".join(keys))
        return sharding_ if sharding_ is not None and len(leaf.shape) == len(sharding_.spec) else replicated

    return jax.tree_util.tree_map_with_path(place, opt_shapes)


def initial_state(p: Plan, seed: int) -> tuple[Any, Any, Any]:
    """(trainable, frozen, opt_state) of a new run, laid out as planned: init_from's weights, or a fresh
    initialisation."""
    full_abstract = merge_params(p.abstract_trainable, p.abstract_frozen)
    if p.cfg.init_from:
        full = checkpoint.restore_params(p.cfg.init_from, full_abstract)
    else:
        full = jax.jit(lambda: checkpoint.params_dict(p.make_model(nnx.Rngs(seed))),
                       out_shardings=jax.tree.map(lambda a: a.sharding, full_abstract))()
    trainable, frozen = split_params(full, p.owner)
    opt_state = jax.jit(p.tx.init, out_shardings=jax.tree.map(lambda a: a.sharding, p.abstract_opt_state))(trainable)
    return trainable, frozen, opt_state


def _global_batch(host_batch: dict[str, np.ndarray], shapes: dict[str, jax.ShapeDtypeStruct]) -> dict[str, jax.Array]:
    """Assembles each host's rows into global arrays laid out as the plan says."""
    for key, spec in shapes.items():
        if not np.can_cast(host_batch[key].dtype, spec.dtype, "same_kind"):
            raise TypeError(f"batch[{key!r}] is {host_batch[key].dtype}, the compiled step takes {spec.dtype} "
                            "(see data.batch.FIELDS)")
    return {key: jax.make_array_from_process_local_data(spec.sharding, np.asarray(host_batch[key], spec.dtype),
                                                        spec.shape)
            for key, spec in shapes.items()}


def _all_processes(state: dict) -> list[dict]:
    """Every process's data-iterator state (each host reads its own shard), gathered to all of them."""
    if jax.process_count() == 1:
        return [state]
    blob = np.frombuffer(json.dumps(state).encode(), np.uint8)
    lengths = multihost_utils.process_allgather(np.int32(blob.size))
    padded = np.zeros(int(lengths.max()), np.uint8)
    padded[: blob.size] = blob
    gathered = multihost_utils.process_allgather(padded)
    return [json.loads(bytes(row[:n]).decode()) for row, n in zip(gathered, lengths)]


def _prepare_demo_data(cfg: ml_collections.ConfigDict) -> None:
    """Points the data config at the demo set (config ``demo_data.dir``), writing it on first use."""
    if not cfg.demo_data.dir:
        return
    if jax.process_index() == 0:
        ensure_demo_dataset(cfg.demo_data.dir, cfg.demo_data.num_records or 512)
    multihost_utils.sync_global_devices("demo data written")
    demo = ensure_demo_dataset(cfg.demo_data.dir, cfg.demo_data.num_records or 512)
    cfg.data.sources = demo.source_configs()
    cfg.data.tokenizer = demo.tokenizer_dir


def _held_out_accuracy(graphdef: nnx.GraphDef, trainable: Any, frozen: Any, tokenizer: Any,
                       questions: dict[str, list[Question]], batch_size: int) -> dict[str, float]:
    """``eval/<name>``: multiple-choice accuracy of the current parameters on each held-out set."""
    model = nnx.merge(graphdef, trainable, frozen)
    return {f"eval/{name}": evaluate(model, tokenizer, qs, batch_size, progress=False)["accuracy"]
            for name, qs in questions.items()}


def train(cfg: ml_collections.ConfigDict, workdir: str, mesh: jax.sharding.Mesh | None = None,
          guard: PreemptionGuard | None = None) -> dict[str, Any]:
    """Runs (or resumes) training; returns the last logged metrics and how the run ended.

    ``mesh`` defaults to the config's mesh over all devices; ``guard`` (default: one installed here)
    turns SIGTERM / SIGINT into a save-and-stop.
    """
    own_guard = guard is None
    guard = guard or PreemptionGuard()
    _prepare_demo_data(cfg)
    mesh = mesh or sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    p = plan(cfg, mesh, jax.process_count())
    eval_every = cfg.train.eval_every  # its files are read before anything is opened that would need closing
    questions = {name: read_questions(path) for name, path in cfg.train.eval_data.items()} if eval_every else {}
    graphdef = nnx.split(abstract_model(p.make_model))[0] if eval_every else None
    tokenizer_dir = cfg.data.tokenizer or cfg.init_from
    tokenizer = load_tokenizer(tokenizer_dir)
    first_process = jax.process_index() == 0
    if first_process and not (epath.Path(workdir) / checkpoint.CONFIG_FILE).exists():
        copy_tokenizer_files(tokenizer_dir, workdir)
        # what init_from knew about its weights (source dtype, layout details) stays true for the run's
        inherited = checkpoint.read_config(cfg.init_from)[1] if cfg.init_from else {}
        checkpoint.write_config(workdir, p.model_cfg, {**inherited, "source": "training", "init_from": cfg.init_from,
                                                        "run_config": cfg.to_json()})

    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    full_abstract = merge_params(p.abstract_trainable, p.abstract_frozen)
    restored = ckpt.restore_latest(full_abstract, p.abstract_opt_state)
    data = make_data_iterator(
        cfg.data, tokenizer=tokenizer, image_size=p.model_cfg.vision.image_size if p.model_cfg.vision else 0,
        tokens_per_image=p.model_cfg.tokens_per_image, global_batch_size=cfg.train.global_batch_size,
        process_index=jax.process_index(), process_count=jax.process_count())
    if restored is not None:
        start, full, opt_state, extra = restored
        trainable, frozen = split_params(full, p.owner)
        if len(extra["data"]) != jax.process_count():
            raise TrainingError(f"the checkpoint at step {start} in {workdir} was written by {len(extra['data'])} "
                                f"processes; resume it with the same number (now {jax.process_count()})")
        data.set_state(extra["data"][jax.process_index()])
        log.info("resumed from step %d of %s", start, workdir)
    else:
        start = 0
        trainable, frozen, opt_state = initial_state(p, seed=cfg.train.seed)

    peak = cfg.train.peak_flops or peak_flops_per_device()
    writer = MetricsWriter(workdir, cfg.train.steps, start, enabled=first_process,
                           wandb_project=cfg.train.wandb_project, run_config=cfg.to_dict())
    if start == 0:
        writer.message(f"model FLOPs per step: {p.flops_per_step:.4g}; peak per device: "
                       f"{'unknown (MFU not reported)' if peak is None else f'{peak:.4g} FLOP/s'}; "
                       f"mesh {dict(mesh.shape)}; {sum(x.size for x in jax.tree.leaves(trainable)):,} trainable "
                       f"parameters in groups {sorted(set(p.owner.values()))}")
        if eval_every:
            writer.write(0, _held_out_accuracy(graphdef, trainable, frozen, tokenizer, questions,
                                               cfg.train.eval_batch_size))
    profile = tuple(cfg.train.profile_steps)
    tracing = False
    last, ended, saved_step = {}, "completed", start if restored is not None else None
    tick = time.perf_counter()
    try:
        batch = _global_batch(next(data), p.batch_shapes) if start < cfg.train.steps else None
        for step in range(start, cfg.train.steps):
            if guard.requested:  # the signal came during start-up (planning, restoring): no step to save
                ended = guard.signal_name
                writer.message(f"{ended} before step {step + 1}: nothing new to save; rerun the same command "
                               "to resume")
                break
            if profile and step == profile[0]:
                jax.profiler.start_trace(os.path.join(workdir, "profile"))
                tracing = True
            trainable, opt_state, metrics = p.step_fn(trainable, frozen, opt_state, jnp.int32(step), batch)
            resume_state = data.get_state()  # a checkpoint after this step continues from here
            if step + 1 < cfg.train.steps:  # the next batch is read and sent while the device computes
                batch = _global_batch(next(data), p.batch_shapes)
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            seconds, tick = now - tick, now
            if tracing and step == profile[1]:
                jax.profiler.stop_trace()
                tracing = False
            done = step + 1
            if not math.isfinite(float(metrics["loss"])):
                ckpt.wait()
                kept = f"step {saved_step}" if saved_step is not None else "none yet"
                raise TrainingError(f"non-finite loss {float(metrics['loss'])} at step {done}; stopped without "
                                    f"saving it. Last good checkpoint in {workdir}: {kept}. Lower the learning "
                                    "rate or check the data, then rerun to resume from there.")
            last = {
                "loss": float(metrics["loss"]), "grad_norm": float(metrics["grad_norm"]),
                **{k: float(v) for k, v in metrics.items() if k.startswith(LEARNING_RATE_PREFIX)},  # every group's
                "tokens_per_s": float(metrics["tokens"]) / seconds, "step_time_s": seconds,
                "mfu": (p.flops_per_step / seconds / (peak * mesh.size)) if peak else None,
            }
            # a pre-empted run saves first: its grace period is no time for an evaluation
            evaluated = eval_every and not guard.requested and (done % eval_every == 0 or done == cfg.train.steps)
            if evaluated:
                last.update(_held_out_accuracy(graphdef, trainable, frozen, tokenizer, questions,
                                               cfg.train.eval_batch_size))
                tick = time.perf_counter()  # the next step's time and throughput leave the evaluation out
            if evaluated or done % cfg.train.log_every == 0 or done == cfg.train.steps:
                writer.write(done, last)
            if done % cfg.checkpoint.every == 0 or done == cfg.train.steps or guard.requested:
                ckpt.save(done, merge_params(trainable, frozen), opt_state,
                          {"step": done, "data": _all_processes(resume_state)})
                saved_step = done
            if guard.requested:
                ended = guard.signal_name
                writer.message(f"{guard.signal_name}: saved step {done} to {workdir}; rerun the same command to resume")
                break
    finally:
        if tracing:  # the run ended inside the traced range: keep what was traced
            jax.profiler.stop_trace()
        if own_guard:
            guard.restore()
        ckpt.close()
        writer.close()
        where = f" (process {jax.process_index()})" if jax.process_count() > 1 else ""
        log.info("data%s: %s", where, data.stats.summary())
        data.close()
    return {"metrics": last, "ended": ended, "step": saved_step}


def _log_to_stderr() -> None:
    """wings_jax's own log lines on stderr (libraries may have configured the root logger already)."""
    logger = logging.getLogger("wings_jax")
    if not logger.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        logger.propagate = False


def main(argv: Sequence[str] | None = None) -> int:
    guard = _STARTUP_GUARD or PreemptionGuard()  # first: a signal from here on is a clean stop
    try:
        return _main(sys.argv[1:] if argv is None else list(argv), guard)
    finally:
        guard.restore()


def _exit_status(signal_name: str) -> int:
    return 128 + signal.Signals[signal_name].value


def _main(argv: list[str], guard: PreemptionGuard) -> int:
    _log_to_stderr()
    try:
        cfg, path, rest = parse_command_line(argv, default=DEFAULT_CONFIG)
        parser = argparse.ArgumentParser(prog="python -m wings_jax.train", description=__doc__,
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--workdir", help="default: runs/<config name>")
        distributed.add_flags(parser)
        parser.add_argument("--compile_only", action="store_true",
                            help="compile the train step and print its memory and cost, without training")
        parser.add_argument("--topology", help="with --compile_only: a TPU slice such as v5p-64 or v5e-16, "
                                               "compiled for on this machine (needs libtpu)")
        args = parser.parse_args(rest)
        if args.topology and not args.compile_only:
            raise ConfigError("--topology only makes sense with --compile_only")
        workdir = args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(path.split(":")[0]))[0])
        if args.compile_only:
            from wings_jax import aot

            report = aot.compile_only(cfg, topology=args.topology)
            print(aot.format_report(report))
            return 0 if report["fits"] else 3
        if guard.requested:
            print(f"{guard.signal_name} during start-up: stopped before training; nothing written", file=sys.stderr)
            return _exit_status(guard.signal_name)
        distributed.initialize(args)
        result = train(cfg, workdir, guard=guard)
    except (ConfigError, TrainingError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["ended"] != "completed":
        return _exit_status(result["ended"])
    print(f"training finished at step {result['step']}; checkpoints in {workdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
