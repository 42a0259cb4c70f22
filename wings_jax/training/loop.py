"""The training loop: runs (or resumes) a planned step over the data, logging, evaluating and checkpointing."""
from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils

from wings_jax import checkpoint, sharding
from wings_jax.checkpoint import Checkpointer
from wings_jax.data.demo import ensure_demo_dataset
from wings_jax.data.pipeline import make_data_iterator
from wings_jax.data.tokenizer import load_tokenizer
from wings_jax.flops import mfu, peak_flops_per_device
from wings_jax.multiple_choice import Question, evaluate, read_questions
from wings_jax.params import abstract_model
from wings_jax.training import run_config
from wings_jax.training.metrics import LEARNING_RATE_PREFIX, MetricsWriter
from wings_jax.training.plan import initial_state, merge_params, plan, split_params
from wings_jax.training.preemption import PreemptionGuard

log = logging.getLogger("wings_jax.train")


class TrainingError(RuntimeError):
    """The run cannot go on (e.g. a non-finite loss); the message says what was kept."""


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
    run_config.check_sources(cfg)
    mesh = mesh or sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor)
    p = plan(cfg, mesh, jax.process_count())
    eval_every = cfg.train.eval_every  # its files are read before anything is opened that would need closing
    questions = {name: read_questions(path) for name, path in cfg.train.eval_data.items()} if eval_every else {}
    graphdef = nnx.split(abstract_model(p.make_model))[0] if eval_every else None
    tokenizer_dir = cfg.data.tokenizer or cfg.init_from
    tokenizer = load_tokenizer(tokenizer_dir)
    first_process = jax.process_index() == 0
    if first_process:
        checkpoint.start_workdir(workdir, p.model_cfg, tokenizer_dir, cfg.init_from, cfg.to_json())

    ckpt = Checkpointer(workdir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    full_abstract = merge_params(p.abstract_trainable, p.abstract_frozen)
    restored = ckpt.restore_newest(full_abstract, p.abstract_opt_state)
    data = make_data_iterator(
        cfg.data, tokenizer=tokenizer, image_size=p.model_cfg.image_size,
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
                "mfu": mfu(p.flops_per_step, seconds, peak, mesh.size),
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
