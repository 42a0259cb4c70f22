"""Logical axis names, the one table of rules that maps them onto mesh axes, and mesh helpers.

Every parameter carries a tuple of logical axis names (metadata ``logical_axes`` on its
``nnx.Param``); activations are annotated with :func:`constrain`. Changing how the model is
laid out over a ``Mesh('data', 'fsdp', 'tensor')`` means editing :data:`DEFAULT_RULES`, nothing else.
"""
from __future__ import annotations

import contextlib
import contextvars
import math
from typing import Any, Callable, Iterator, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from wings_jax.params import flat_variables, unflatten_dict

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of mesh axes, or None for replicated)
Rules = Sequence[tuple[str, str | tuple[str, ...] | None]]
DEFAULT_RULES: Rules = (
    # activations
    ("act_batch", ("data", "fsdp")),
    ("act_length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_head_dim", None),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    ("act_images", None),
    # parameters
    ("layers", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("mlp", "tensor"),
    ("lora_rank", None),
    ("router_len", None),
    ("router_out", None),
    ("vision_embed", "fsdp"),
    ("vision_heads", "tensor"),
    ("vision_mlp", "tensor"),
    ("vision_patch", None),
    ("vision_positions", None),
)


class ShardingError(ValueError):
    """A mesh or a layout that cannot work; raised before anything is compiled."""


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds a ``Mesh(('data', 'fsdp', 'tensor'))``; one of the sizes may be -1 to take the rest."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = [data, fsdp, tensor]
    if sum(s == -1 for s in sizes) > 1:
        raise ShardingError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): at most one axis may be -1")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): sizes must be positive or -1")
    known = math.prod(s for s in sizes if s != -1)
    if -1 in sizes:
        if len(devices) % known:
            raise ShardingError(
                f"mesh (data={data}, fsdp={fsdp}, tensor={tensor}): {len(devices)} devices are not a multiple of {known}"
            )
        sizes[sizes.index(-1)] = len(devices) // known
    if math.prod(sizes) != len(devices):
        raise ShardingError(
            f"mesh (data={sizes[0]}, fsdp={sizes[1]}, tensor={sizes[2]}) needs {math.prod(sizes)} devices, "
            f"but {len(devices)} are present"
        )
    device_array = _device_grid(devices, sizes)
    return Mesh(device_array, MESH_AXES)


def _device_grid(devices: list[jax.Device], sizes: list[int]) -> np.ndarray:
    try:  # topology-aware placement where the platform supports it (TPU, GPU)
        from jax.experimental import mesh_utils

        if jax.process_count() > 1 or devices[0].platform != "cpu":
            return mesh_utils.create_device_mesh(sizes, devices=devices)
    except Exception:  # noqa: BLE001 - fall back to the plain order below
        pass
    return np.asarray(devices, dtype=object).reshape(sizes)


def spec_for(axes: Sequence[str | None], rules: Rules = DEFAULT_RULES) -> PartitionSpec:
    """PartitionSpec for a tuple of logical axis names; a mesh axis is used at most once."""
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in axes:
        target = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise ShardingError(f"logical axis {name!r} has no sharding rule; add it to wings_jax.sharding rules")
        mesh_axes = tuple(a for a in _mesh_axes(target) if a not in used)
        used.update(mesh_axes)
        out.append(_entry(mesh_axes))
    return PartitionSpec(*out)


def _mesh_axes(entry: str | tuple[str, ...] | None) -> tuple[str, ...]:
    """The mesh axes of a rule target or PartitionSpec entry."""
    return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _entry(mesh_axes: tuple[str, ...]) -> str | tuple[str, ...] | None:
    """The PartitionSpec entry of some mesh axes (the inverse of :func:`_mesh_axes`)."""
    return mesh_axes[0] if len(mesh_axes) == 1 else (mesh_axes or None)


def mesh_axis_size(mesh: Mesh, entry: str | tuple[str, ...] | None) -> int:
    return math.prod(mesh.shape[n] for n in _mesh_axes(entry))


def _fitted_spec(shape: Sequence[int], axes: Sequence[str | None], mesh: Mesh, rules: Rules) -> PartitionSpec:
    """``spec_for(axes)``, a dimension its mesh axes do not divide (a batch of 1 in generation, say) not split."""
    return PartitionSpec(*(e if d % mesh_axis_size(mesh, e) == 0 else None
                           for d, e in zip(shape, spec_for(axes, rules))))


def check_divisible(shape: Sequence[int], spec: PartitionSpec, mesh: Mesh, what: str) -> None:
    for dim, entry in zip(shape, spec):
        size = mesh_axis_size(mesh, entry)
        if dim % size:
            raise ShardingError(
                f"{what}: dimension {dim} (shape {tuple(shape)}) is split over mesh axes {entry} of size {size}, "
                f"which does not divide it; change the mesh or the sharding rule"
            )


# ---------------------------------------------------------------------------------------------
# Parameters

def logical_axes_of(variable: nnx.Variable) -> tuple[str | None, ...]:
    axes = variable.get_metadata().get("logical_axes")
    if axes is None:
        return (None,) * np.ndim(variable.get_value())
    return tuple(axes)


def state_shardings(state: Any, mesh: Mesh, rules: Rules = DEFAULT_RULES) -> dict:
    """NamedShardings for every variable of an ``nnx.State``, as a pure nested dict (the shape of
    ``state.to_pure_dict()``); raises if a dimension does not divide its mesh axes."""
    out = {}
    for name, variable in flat_variables(state).items():
        spec = spec_for(logical_axes_of(variable), rules)
        check_divisible(np.shape(variable.get_value()), spec, mesh, f"parameter {name}")
        out[name] = NamedSharding(mesh, spec)
    return unflatten_dict(out)


# ---------------------------------------------------------------------------------------------
# Activations

_ACTIVE: contextvars.ContextVar[tuple[Mesh, Rules] | None] = contextvars.ContextVar("wings_sharding", default=None)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh, rules: Rules = DEFAULT_RULES) -> Iterator[None]:
    """Within this context (while tracing), :func:`constrain` pins activations onto ``mesh``."""
    token = _ACTIVE.set((mesh, rules))
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """``with_sharding_constraint`` by logical names; a no-op outside :func:`activation_sharding`."""
    active = _ACTIVE.get()
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, _fitted_spec(x.shape, axes, mesh, rules)))


def gathered(w: jax.Array, axes: Sequence[str | None]) -> jax.Array:
    """A parameter (logical ``axes``) as a matmul reads it: gathered over the mesh axes that split the batch,
    only its tensor-parallel split kept; a no-op outside :func:`activation_sharding`.

    FSDP's all-gather, made explicit so that it happens once per use, in the dtype the caller cast to (bf16:
    half the bytes of the fp32 master copy). Left implicit, XLA's TPU partitioner may instead run the matmul
    as a windowed loop over the shards, each step contracting one shard's slice (128 of 4096 rows at fsdp=32)
    and re-adding the full output: the cost model charged that 37% of the 7B finetune step on v5p-64.
    """
    active = _ACTIVE.get()
    if active is None:
        return w
    mesh, rules = active
    batch_axes = set(_mesh_axes(spec_for(("act_batch",), rules)[0]))
    spec = PartitionSpec(*(_entry(tuple(a for a in _mesh_axes(e) if a not in batch_axes))
                           for e in spec_for(axes, rules)))
    return jax.lax.with_sharding_constraint(w, NamedSharding(mesh, spec))


def platform() -> str:
    """The platform the traced program is for: the active mesh's devices (a TPU slice compiled from a CPU
    machine says "tpu"), else JAX's default backend."""
    active = _ACTIVE.get()
    return active[0].devices.flat[0].platform if active else jax.default_backend()


def per_shard(fn: Callable[..., jax.Array], args: Sequence[jax.Array], leading_axes: Sequence[Sequence[str]]
              ) -> jax.Array:
    """``fn(*args)`` run on each device's shard (``shard_map``) under :func:`activation_sharding`, else once.

    For a kernel XLA cannot partition (a Pallas call). ``leading_axes[i]``: the logical names of ``args[i]``'s
    leading dimensions (the rest are not split; a dimension its mesh axes do not divide is not split either);
    the result is split like ``args[0]``.
    """
    active = _ACTIVE.get()
    if active is None:
        return fn(*args)
    mesh, rules = active
    specs = [_fitted_spec(x.shape, (*axes, *(None,) * (x.ndim - len(axes))), mesh, rules)
             for x, axes in zip(args, leading_axes)]
    return jax.shard_map(fn, mesh=mesh, in_specs=tuple(specs), out_specs=specs[0], check_vma=False)(*args)


def batch_sharding(mesh: Mesh, ndim: int, rules: Rules = DEFAULT_RULES) -> NamedSharding:
    """Sharding of a data array whose leading axis is the global batch."""
    return NamedSharding(mesh, spec_for(("act_batch",) + (None,) * (ndim - 1), rules))


def rules_from_config(overrides: Mapping[str, Any] | None) -> Rules:
    """DEFAULT_RULES with some names remapped (config ``mesh.rules``: ``{"embed": None, ...}``)."""
    if not overrides:
        return DEFAULT_RULES
    table = dict(DEFAULT_RULES)
    for name, target in overrides.items():
        if name not in table:
            raise ShardingError(f"mesh.rules names unknown logical axis {name!r}; known: {', '.join(table)}")
        if target is not None and not isinstance(target, (str, tuple, list)):
            raise ShardingError(f"mesh.rules[{name!r}] must be a mesh axis name, a tuple of them, or None")
        for axis in _mesh_axes(target):
            if axis not in MESH_AXES:
                raise ShardingError(f"mesh.rules[{name!r}] names unknown mesh axis {axis!r}; mesh axes: {MESH_AXES}")
        table[name] = tuple(target) if isinstance(target, list) else target
    return tuple(table.items())
