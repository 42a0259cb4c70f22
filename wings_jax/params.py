"""Parameter trees by path: flat views of ``nnx`` state and building a module from given values.

A path is the '/'-joined attribute path of a parameter, e.g. ``llm/layers/attn/q/kernel``.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

# Path prefixes of WingsModel's parts, the parameter groups recipes train and converters map.
LLM = "llm/"
LEARNERS = LLM + "layers/side/"  # every layer's Wings side branch: the visual and textual learners and router
VISUAL_LEARNER = LEARNERS + "visual/"
ROUTER = LEARNERS + "router/"
PROJECTOR = "projector/"
VISION = "vision/"


def prefix_pattern(prefix: str) -> str:
    """The ``optim.groups`` pattern (a regex searched in each path) of the parameters under ``prefix``."""
    return "^" + re.escape(prefix)


LLM_WITHOUT_LEARNERS = prefix_pattern(LLM) + f"(?!{re.escape(LEARNERS[len(LLM):])})"


def component(path: str) -> str:
    """The part of the model a parameter belongs to: 'learners', 'projector', 'vision' or 'llm'
    (the names of :data:`wings_jax.flops.COMPONENTS`)."""
    for prefix, name in ((LEARNERS, "learners"), (PROJECTOR, "projector"), (VISION, "vision")):
        if path.startswith(prefix):
            return name
    return "llm"


def path_str(path: tuple) -> str:
    return "/".join(str(getattr(p, "key", p)) for p in path)


def flat_variables(state: nnx.State) -> dict[str, nnx.Variable]:
    """'a/b/c' -> Variable for every variable of ``state``."""
    return {path_str(path): var for path, var in nnx.to_flat_state(state)}


def flat_values(state: nnx.State) -> dict[str, Any]:
    return {p: v.get_value() for p, v in flat_variables(state).items()}


def flatten_dict(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{'a': {'b': x}} -> {'a/b': x} (pure parameter dicts, as ``State.to_pure_dict()`` gives)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        path = f"{prefix}/{key}" if prefix else str(key)
        out.update(flatten_dict(value, path) if isinstance(value, Mapping) else {path: value})
    return out


def unflatten_dict(flat: Mapping[str, Any]) -> dict[str, Any]:
    """{'a/b': x} -> {'a': {'b': x}} (keys are strings: parameter trees here have no list indices)."""
    out: dict[str, Any] = {}
    for path, value in flat.items():
        node = out
        *parents, leaf = path.split("/")
        for key in parents:
            node = node.setdefault(key, {})
        node[leaf] = value
    return out


def abstract_model(make_model: Callable[[nnx.Rngs], nnx.Module]) -> nnx.Module:
    """``make_model`` with shape-only parameters (no memory, no compute)."""
    return nnx.eval_shape(lambda: make_model(nnx.Rngs(0)))


def param_shapes(module: nnx.Module) -> dict[str, tuple[int, ...]]:
    """Shapes of every Param of ``module`` (abstract modules work too)."""
    return {p: tuple(v.get_value().shape) for p, v in flat_variables(nnx.state(module, nnx.Param)).items()}


def materialize(make_model: Callable[[nnx.Rngs], nnx.Module], values: Mapping[str, Any], seed: int = 0) -> nnx.Module:
    """Builds ``make_model`` with ``values`` (path -> array) and fresh initial values elsewhere.

    Only the parameters absent from ``values`` are initialised: the init runs under ``jit`` and
    returns just those, so XLA drops the work (and memory) of the others.
    """
    graphdef, state = nnx.split(abstract_model(make_model))
    variables = flat_variables(state)
    unknown = sorted(set(values) - set(variables))
    if unknown:
        raise KeyError(f"values for parameters the model does not have: {', '.join(unknown)}")
    fresh_paths = sorted(set(variables) - set(values))
    fresh = {}
    if fresh_paths:
        wanted = set(fresh_paths)

        @jax.jit
        def init_subset():
            full = flat_variables(nnx.state(make_model(nnx.Rngs(seed))))
            return {p: v.get_value() for p, v in full.items() if p in wanted}

        fresh = init_subset()
    for path, var in variables.items():
        target = var.get_value()
        value = values[path] if path in values else fresh[path]
        if tuple(np.shape(value)) != tuple(target.shape):
            raise ValueError(f"parameter {path}: got shape {tuple(np.shape(value))}, the model needs {tuple(target.shape)}")
        var.set_value(jnp.asarray(value, dtype=target.dtype))
    return nnx.merge(graphdef, state)
