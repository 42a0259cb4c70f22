"""Compile-ahead planning: compile the train step for a TPU slice (or the local devices) without running it.

    python -m wings_jax.train --config configs/finetune.py --compile_only --topology v5p-32

:func:`compile_only` builds the run's :func:`wings_jax.training.plan.plan` over the devices of a TPU
topology description (from libtpu, no TPU needed) or over the local devices, lowers and compiles
the sharded train step from abstract arguments (no parameter values, no data files), and reports
what XLA says about one chip: memory, FLOPs and its step-time estimate. :func:`format_report`
renders the report; ``report["fits"]`` tells whether the step fits the chip's memory.

Slice names follow Cloud TPU: ``v4-N`` and ``v5p-N`` count TensorCores (2 per chip), ``v5e-N``
(``v5litepod-N``) and ``v6e-N`` count chips. libtpu's own form, e.g. ``v5p:2x2x4``, is accepted too.

The step-time estimate is XLA's TPU cost model (``optimal_seconds`` of ``cost_analysis()``). XLA
counts the body of every ``while`` loop once (scanned layers, attention chunks, loss chunks), so
the estimate is scaled by the trip counts read from the compiled HLO, weighting each instruction
by the cycles the TPU compiler estimated for it (see :func:`wings_jax.hlo_loops.loop_scale`).
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import importlib.util
import math
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from wings_jax import sharding
from wings_jax.flops import PEAK_FLOPS, mfu, peak_flops_per_device
from wings_jax.hlo_loops import cycle_breakdown, kernel_calls, loop_scale
from wings_jax.params import LLM, PROJECTOR, VISION, VISUAL_LEARNER, flatten_dict
from wings_jax.training.plan import plan

GIB = 1024**3
# Parameters whose layout the report shows (those the model has).
REPRESENTATIVE_PARAMS = (
    f"{LLM}embed/embedding", f"{LLM}layers/attn/q/kernel", f"{LLM}layers/mlp/down/kernel", f"{LLM}lm_head/kernel",
    f"{VISUAL_LEARNER}q_a", f"{PROJECTOR}fc1/kernel", f"{VISION}layers/mlp/fc1/kernel",
)


class AotError(ValueError):
    """The compile-ahead plan cannot be made (unknown slice, libtpu missing); the message says what to do."""


@dataclasses.dataclass(frozen=True)
class TpuGeneration:
    name: str  # libtpu's topology prefix
    hbm_bytes: int  # per chip
    peak_key: str  # entry of wings_jax.flops.PEAK_FLOPS
    cores_per_chip_in_name: int  # v4-32 / v5p-32 count TensorCores (2 per chip); v5e / v6e names count chips
    torus_dims: int


GENERATIONS = {
    "v4": TpuGeneration("v4", 32 * GIB, "v4", 2, 3),
    "v5p": TpuGeneration("v5p", 95 * GIB, "v5p", 2, 3),
    "v5e": TpuGeneration("v5e", 16 * GIB, "v5e", 1, 2),
    "v6e": TpuGeneration("v6e", 32 * GIB, "v6", 1, 2),
}
ALIASES = {"v5litepod": "v5e", "v5lite": "v5e"}


@dataclasses.dataclass(frozen=True)
class Slice:
    name: str  # as given
    generation: TpuGeneration
    libtpu_name: str  # e.g. "v5p:2x2x4"
    chips: int


def parse_topology(name: str) -> Slice:
    """``v5p-64`` / ``v5e-16`` / ``v5litepod-16`` / ``v4-32`` / ``v6e-8``, or libtpu's ``v5p:2x4x4``."""
    match = re.fullmatch(r"(v\d+[a-z]*)(?:-(\d+)|:(\d+(?:x\d+)+))", name.strip().lower())
    gen_name = ALIASES.get(match.group(1), match.group(1)) if match else None
    if gen_name not in GENERATIONS:
        raise AotError(f"unknown TPU slice {name!r}; use e.g. v5p-64, v5e-16 (v5litepod-16), v4-32, v6e-8 "
                       f"or libtpu's form v5p:2x4x4 (generations: {', '.join(GENERATIONS)})")
    gen = GENERATIONS[gen_name]
    if match.group(3):
        dims = [int(d) for d in match.group(3).split("x")]
        if len(dims) != gen.torus_dims or min(dims) < 1:
            raise AotError(f"{name!r}: a {gen.name} topology has {gen.torus_dims} dimensions, e.g. "
                           f"{gen.name}:{'x'.join(['2'] * gen.torus_dims)}")
        return Slice(name, gen, f"{gen.name}:{match.group(3)}", math.prod(dims))
    count = int(match.group(2))
    chips, rest = divmod(count, gen.cores_per_chip_in_name)
    if rest or chips < 1 or chips & (chips - 1):
        unit = "TensorCores (2 per chip)" if gen.cores_per_chip_in_name == 2 else "chips"
        raise AotError(f"{name!r}: {gen.name}-N counts {unit}; N must give a power-of-two number of chips. "
                       f"For other shapes give the topology itself, e.g. {gen.name}:{'x'.join(['2'] * gen.torus_dims)}")
    return Slice(name, gen, f"{gen.name}:{'x'.join(map(str, _torus(chips, gen.torus_dims)))}", chips)


def _torus(chips: int, ndim: int) -> list[int]:
    """The Cloud TPU shape of a power-of-two slice: 4 -> 2x2x1, 16 -> 2x2x4, 32 -> 4x8 (2-D)."""
    dims = [1] * ndim
    while math.prod(dims) < chips:
        dims[dims.index(min(dims))] *= 2
    dims.sort()
    return [d for d in dims if d > 1] + [d for d in dims if d == 1]


def libtpu_requirement() -> str:
    """The libtpu pin of ``jax[tpu]`` for the installed jax, e.g. ``libtpu==0.0.42.*``."""
    for requirement in importlib.metadata.requires("jax") or ():
        spec, _, marker = requirement.partition(";")
        if spec.strip().startswith("libtpu") and "tpu" in marker:
            return spec.replace(" ", "")
    return f"jax[tpu]=={jax.__version__}"


def topology_devices(s: Slice) -> list[jax.Device]:
    """Compile-only devices of the slice, from libtpu (works on a machine without a TPU)."""
    if not (os.environ.get("TPU_LIBRARY_PATH") or importlib.util.find_spec("libtpu")):
        raise AotError(f"compiling for {s.name} needs libtpu (the TPU compiler), which is not installed; "
                       f"install the version matching jax {jax.__version__}: pip install '{libtpu_requirement()}' "
                       f"(or pip install 'jax[tpu]=={jax.__version__}')")
    # Another JAX process on this machine may hold libtpu's lock file (any JAX process that found
    # libtpu installed takes it); compiling needs no exclusive access to a TPU.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return list(topologies.get_topology_desc(s.libtpu_name, "tpu").devices)
    except Exception as e:  # noqa: BLE001 - libtpu's errors name the problem; add what was asked
        raise AotError(f"libtpu could not describe {s.name} (as {s.libtpu_name!r}): {e}") from e


def compile_only(cfg: ml_collections.ConfigDict, topology: str | None = None) -> dict[str, Any]:
    """Compiles the config's train step for ``topology`` (a TPU slice name) or the local devices.

    Returns the report :func:`format_report` renders; ``"fits"`` is whether one chip's memory
    holds the step. Opens no data file and creates no parameter values.
    """
    if topology:
        target = parse_topology(topology)
        devices = topology_devices(target)
        hbm = target.generation.hbm_bytes
        peak = dict(PEAK_FLOPS)[target.generation.peak_key]
        where = f"{target.name} ({target.libtpu_name}, {len(devices)} chips"
    else:
        devices = jax.devices()
        stats = devices[0].memory_stats() or {}
        hbm = stats.get("bytes_limit")
        peak = peak_flops_per_device(devices[0])
        where = f"local devices ({len(devices)} x {devices[0].device_kind}"
    hosts = len({d.process_index for d in devices})
    mesh = sharding.make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices=devices)
    p = plan(cfg, mesh, hosts)
    step_number = jax.ShapeDtypeStruct((), jnp.int32, sharding=NamedSharding(mesh, PartitionSpec()))

    tick = time.perf_counter()
    lowered = p.step_fn.lower(p.abstract_trainable, p.abstract_frozen, p.abstract_opt_state, step_number,
                              p.batch_shapes)
    lower_seconds, tick = time.perf_counter() - tick, time.perf_counter()
    report: dict[str, Any] = {
        "target": f"{where}, {hosts} host{'s' if hosts > 1 else ''})", "topology": topology,
        "device_kind": devices[0].device_kind, "chips": len(devices), "hosts": hosts,
        "mesh": dict(mesh.shape), "remat": cfg.runtime.remat, "global_batch_size": cfg.train.global_batch_size,
        "grad_accum": cfg.train.grad_accum, "max_len": cfg.data.max_len, "hbm_bytes": hbm,
        "model_flops": p.flops_per_step, "peak_flops": peak, "parameters": _representative(p),
        "lower_seconds": lower_seconds, "compiler_error": None,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # The TPU compiler refuses a program that cannot fit and says how much it needed.
        needed = _oom_temporaries(str(e))
        arguments = sum(_shard_bytes(a) for a in jax.tree.leaves(
            (p.abstract_trainable, p.abstract_frozen, p.abstract_opt_state, p.batch_shapes)))
        report.update(compile_seconds=time.perf_counter() - tick, compiler_error=str(e).strip(),
                      memory={"arguments": arguments, "temporaries": needed},
                      total_bytes=None if needed is None else arguments + needed, fits=False,
                      compiler_flops=None, optimal_seconds=None, estimated_step_seconds=None, mfu=None,
                      step_time_note="not compiled: out of memory")
        return report
    report["compile_seconds"] = time.perf_counter() - tick

    mem = compiled.memory_analysis()
    memory = {
        "arguments": mem.argument_size_in_bytes, "outputs": mem.output_size_in_bytes,
        "aliased": mem.alias_size_in_bytes, "temporaries": mem.temp_size_in_bytes,
        "generated_code": mem.generated_code_size_in_bytes,
    }
    total = memory["arguments"] + memory["outputs"] - memory["aliased"] + memory["temporaries"] \
        + memory["generated_code"]
    cost = compiled.cost_analysis() or {}
    optimal = cost.get("optimal_seconds")
    hlo = compiled.as_text()
    scale = loop_scale(hlo) if optimal and optimal > 0 else None
    kernels = kernel_calls(hlo)
    if optimal is None:
        note = f"the {devices[0].platform.upper()} compiler gives no step-time estimate"
    elif optimal <= 0:
        note = f"XLA's optimal_seconds is {optimal:.4g}, not a usable estimate"
    elif scale is None:
        note = "XLA's optimal_seconds counts each loop body once and the loops' trip counts could not be read"
    else:
        note = f"XLA's optimal_seconds x {scale:.2f} for loop trip counts"
        if kernels:
            note += (f"; without the time of {kernels} Pallas kernel call sites (attention='splash'), which the cost "
                     "model does not cost: a lower bound on the step, an upper bound on MFU")
    step_seconds = optimal * scale if optimal and scale else None
    report.update(
        memory=memory, total_bytes=total, fits=hbm is None or total <= hbm,
        compiler_flops=cost.get("flops"), optimal_seconds=optimal, estimated_step_seconds=step_seconds,
        step_time_note=note, uncosted_kernels=kernels,
        cycle_breakdown=cycle_breakdown(hlo) if step_seconds else None,
        mfu=mfu(p.flops_per_step, step_seconds, peak, len(devices)),
    )
    return report


def _oom_temporaries(message: str) -> int | None:
    """Bytes of temporaries named by the TPU compiler's out-of-memory error, e.g. '... temporaries (36.20G) ...'."""
    match = re.search(r"temporaries \(([\d.]+)([KMGT])\)", message)
    return int(float(match.group(1)) * 1024 ** ("KMGT".index(match.group(2)) + 1)) if match else None


def _shard_bytes(a: jax.ShapeDtypeStruct) -> int:
    return math.prod(a.sharding.shard_shape(a.shape)) * a.dtype.itemsize


def _representative(p: Any) -> list[dict[str, Any]]:
    out = []
    for trainable, tree in ((True, p.abstract_trainable), (False, p.abstract_frozen)):
        for name, leaf in flatten_dict(tree).items():
            if name in REPRESENTATIVE_PARAMS:
                out.append({"path": name, "shape": tuple(leaf.shape), "dtype": str(leaf.dtype),
                            "spec": str(leaf.sharding.spec), "trainable": trainable})
    return sorted(out, key=lambda r: REPRESENTATIVE_PARAMS.index(r["path"]))


def _gib(n: float | None) -> str:
    if n is None:
        return "unknown"
    return f"{n / GIB:.2f} GiB" if abs(n) >= GIB else f"{n / 2**20:.2f} MiB"


def format_report(report: dict[str, Any]) -> str:
    """The report as text: what was compiled, memory per chip against the chip's, cost, layouts."""
    r = report
    mesh = ", ".join(f"{k}={v}" for k, v in r["mesh"].items())
    lines = [
        f"compile-only plan for {r['target']}",
        f"  device kind {r['device_kind']}; mesh {mesh}; remat {r['remat']}; global batch {r['global_batch_size']} "
        f"(grad_accum {r['grad_accum']}) x {r['max_len']} tokens",
        f"  lowered in {r['lower_seconds']:.1f} s, compiled in {r['compile_seconds']:.1f} s",
        "memory per chip:",
    ]
    if r["compiler_error"] is None:
        lines += [f"  {key.replace('_', ' '):<16}{_gib(value):>12}" for key, value in r["memory"].items()]
        lines.append(f"  {'total':<16}{_gib(r['total_bytes']):>12}   (arguments + outputs - aliased + temporaries "
                     "+ generated code)")
    else:
        lines += [
            "  the TPU compiler refused the program: " + r["compiler_error"].splitlines()[0][:300],
            f"  {'arguments':<16}{_gib(r['memory']['arguments']):>12}   (parameters, optimizer state, batch)",
            f"  {'temporaries':<16}{_gib(r['memory']['temporaries']):>12}   (as the compiler reported)",
            f"  {'total':<16}{_gib(r['total_bytes']):>12}   (at least)",
        ]
    hbm = r["hbm_bytes"]
    if hbm is None:
        lines.append("  device memory size unknown: not checked (fits reported as true)")
    else:
        lines.append(f"  chip memory     {_gib(hbm):>12}   ({'fits' if r['fits'] else 'DOES NOT FIT'}"
                     + (f", {100 * r['total_bytes'] / hbm:.0f}% used)" if r["total_bytes"] is not None else ")"))
    lines.append("cost:")
    chips = r["chips"]
    lines.append(f"  model FLOPs per step     {r['model_flops']:.4g} ({r['model_flops'] / chips:.4g} per chip)")
    if r["compiler_flops"] is not None:
        lines.append(f"  compiler FLOPs per chip  {r['compiler_flops']:.4g} (XLA counts each loop body once)")
    if r["estimated_step_seconds"] is not None:
        lines.append(f"  estimated step time      {r['estimated_step_seconds']:.3f} s ({r['step_time_note']})")
    else:
        lines.append(f"  estimated step time      unavailable ({r['step_time_note']})")
    if r["mfu"] is not None:
        bound = "at most " if r.get("uncosted_kernels") else ""
        lines.append(f"  estimated MFU            {bound}{100 * r['mfu']:.1f}% of {r['peak_flops']:.4g} FLOP/s "
                     f"x {chips} chips")
    if r.get("cycle_breakdown"):
        lines.append("  where the estimate goes (share of estimated cycles, by the source line of each op):")
        lines += [f"    {100 * share:5.1f}%  {where}" for where, share in r["cycle_breakdown"]]
    lines.append("parameter layouts:")
    for param in r["parameters"]:
        lines.append(f"  {param['path']:<32} {str(param['shape']):<22} {param['spec']:<34} "
                     f"{'trainable' if param['trainable'] else 'frozen'}")
    if not r["fits"]:
        lines += _advice(r)
    return "\n".join(lines)


def _advice(r: dict[str, Any]) -> list[str]:
    hbm, used = r["hbm_bytes"], r["total_bytes"]
    over = f"{_gib(used - hbm)} over ({used / hbm:.2f}x the chip's {_gib(hbm)})" if used else "by an unknown amount"
    lines = [f"DOES NOT FIT: {over}. To make it fit:"]
    if r["topology"]:
        s = parse_topology(r["topology"])
        # Sharded state shrinks with the chip count; activations do not always: a first guess to try.
        chips = 2 ** math.ceil(math.log2(s.chips * max(2.0, (used or 0) / hbm)))
        lines.append(f"  - more chips, e.g. --topology {s.generation.name}-{chips * s.generation.cores_per_chip_in_name}"
                     " with fsdp over them")
    mesh = r["mesh"]
    if mesh["fsdp"] * mesh["tensor"] < r["chips"]:
        lines.append("  - shard parameters and optimizer state over the chips: --config.mesh.fsdp=-1 --config.mesh.data=1")
    if r["remat"] != "full":
        lines.append("  - recompute activations in the backward pass: --config.runtime.remat=full")
    lines.append(f"  - fewer rows per micro-batch: --config.train.grad_accum={2 * r['grad_accum']} "
                 "(the global batch must stay a multiple of data x fsdp x grad_accum)")
    return lines
