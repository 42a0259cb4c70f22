"""What one training step is: the model, its parameter groups, optimizer, shardings, the compiled step and its FLOPs.

A plan needs the data's shapes (``data.max_len``, ``data.max_images``) but not its sources: it is what
training runs (:mod:`wings_jax.training.loop`) and what compile-only planning lowers (:mod:`wings_jax.aot`).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import ml_collections
from flax import nnx

from wings_jax import checkpoint, sharding
from wings_jax.data.batch import BatchSpec
from wings_jax.flops import count_flops
from wings_jax.model.wings import WingsModel, WingsModelConfig
from wings_jax.params import abstract_model, component, flat_variables, flatten_dict, unflatten_dict
from wings_jax.training import run_config
from wings_jax.training.optimizer import assign_groups, make_optimizer, trainable_filter
from wings_jax.training.step import make_train_step


@dataclasses.dataclass
class Plan:
    """Everything about a run that does not need parameter values: enough to compile its step."""

    cfg: ml_collections.ConfigDict
    model_cfg: WingsModelConfig
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
    image = model_cfg.image_size
    batch_shapes = {k: jax.ShapeDtypeStruct(s, t, sharding=sharding.batch_sharding(mesh, len(s), rules))
                    for k, (s, t) in BatchSpec(b, d.max_len, d.max_images, image).shapes().items()}

    step = make_train_step(graphdef, tx, schedules, grad_accum=cfg.train.grad_accum,
                           loss_chunk=cfg.train.loss_chunk, mesh=mesh, rules=rules,
                           loss_positions=cfg.train.loss_positions, loss_logits_dtype=cfg.train.loss_logits_dtype)
    step_fn = jax.jit(
        step,
        in_shardings=(trainable_sh, frozen_sh, opt_sh, replicated, {k: v.sharding for k, v in batch_shapes.items()}),
        out_shardings=(trainable_sh, opt_sh, replicated),
        donate_argnums=(0, 2),
    )
    components = {component(p) for p in owner}
    flops = count_flops(model_cfg, batch=b, seq_len=d.max_len, images_per_row=d.max_images,
                        trainable=components, loss_positions=cfg.train.loss_positions).training_total
    return Plan(cfg, model_cfg, make_model, owner, tx, abstract_trainable, abstract_frozen,
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
