"""Building blocks shared by the language model, the vision tower and the learners.

Parameters are ``nnx.Param`` with a ``logical_axes`` metadata tuple (see ``wings_jax.sharding``).
Parameters are stored in ``param_dtype`` and every matmul runs in the compute ``dtype``.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx, struct

from wings_jax.model.attention import ATTENTION_NAME
from wings_jax.sharding import gathered, logical_axes_of

Axes = tuple[str | None, ...]
Initializer = Callable[[jax.Array, Sequence[int], Any], jax.Array]

default_kernel_init = jax.nn.initializers.normal(0.02)
zeros_init = jax.nn.initializers.zeros
ones_init = jax.nn.initializers.ones


def make_param(rngs: nnx.Rngs, init: Initializer, shape: Sequence[int], axes: Axes, dtype: Any) -> nnx.Param:
    if len(axes) != len(shape):
        raise ValueError(f"parameter of shape {tuple(shape)} given {len(axes)} logical axes {axes}")
    return nnx.Param(init(rngs.params(), tuple(shape), dtype), logical_axes=tuple(axes))


def compute_weight(param: nnx.Param, dtype: Any) -> jax.Array:
    """``param`` in the compute ``dtype`` as its matmul reads it (:func:`~wings_jax.sharding.gathered`), by the
    logical axes of its metadata: the value's are the last ones (a stacked layer's also name 'layers' first)."""
    w = param[...]
    return gathered(w.astype(dtype), logical_axes_of(param)[-w.ndim:])


class Linear(nnx.Module):
    """``y = x . W (+ b)`` contracting the last ``len(in_shape)`` dims of ``x``; W has shape in_shape + out_shape."""

    def __init__(
        self,
        in_shape: int | Sequence[int],
        out_shape: int | Sequence[int],
        axes: Axes,
        *,
        use_bias: bool = False,
        kernel_init: Initializer = default_kernel_init,
        dtype: Any = jnp.float32,
        param_dtype: Any = jnp.float32,
        rngs: nnx.Rngs,
    ):
        in_shape = (in_shape,) if isinstance(in_shape, int) else tuple(in_shape)
        out_shape = (out_shape,) if isinstance(out_shape, int) else tuple(out_shape)
        self.num_in = len(in_shape)
        self.dtype = dtype
        self.kernel = make_param(rngs, kernel_init, in_shape + out_shape, axes, param_dtype)
        self.bias = make_param(rngs, zeros_init, out_shape, axes[self.num_in:], param_dtype) if use_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.tensordot(x.astype(self.dtype), compute_weight(self.kernel, self.dtype), axes=self.num_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Embed(nnx.Module):
    """Token embedding table (vocab, embed)."""

    def __init__(self, vocab: int, features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.embedding = make_param(rngs, default_kernel_init, (vocab, features), ("vocab", "embed"), param_dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        return jnp.take(self.embedding[...], ids, axis=0).astype(self.dtype)


class RMSNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype: Any, param_dtype: Any, axes: Axes = ("embed",), rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(rngs, ones_init, (features,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        # Normalise in float32, then cast before the scale, as transformers' Qwen2RMSNorm does.
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * normed.astype(self.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, features: int, eps: float, *, dtype: Any, param_dtype: Any, axes: Axes, rngs: nnx.Rngs):
        self.eps = eps
        self.dtype = dtype
        self.scale = make_param(rngs, ones_init, (features,), axes, param_dtype)
        self.bias = make_param(rngs, zeros_init, (features,), axes, param_dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(self.dtype)


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (the "rotate half" layout of transformers' Llama/Qwen2)

@struct.dataclass
class Rotary:
    """RoPE's cos / sin tables (batch, length, 1, head_dim), float32, at given positions: a model call
    builds them once and every layer's projections apply them (no angles recomputed per projection)."""

    cos: jax.Array
    sin: jax.Array

    @classmethod
    def at(cls, positions: jax.Array, theta: float, head_dim: int) -> "Rotary":
        """The tables at integer ``positions`` (batch, length)."""
        inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # (B, L, D/2)
        angles = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
        return cls(jnp.cos(angles), jnp.sin(angles))

    def __call__(self, x: jax.Array) -> jax.Array:
        """RoPE of ``x`` (batch, length, heads, head_dim), in ``x``'s dtype."""
        x1, x2 = jnp.split(x, 2, axis=-1)
        rotated = jnp.concatenate([-x2, x1], axis=-1)
        return x * self.cos.astype(x.dtype) + rotated * self.sin.astype(x.dtype)


def rotary_embedding(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Applies RoPE to ``x`` of shape (batch, length, heads, head_dim) at integer ``positions`` (batch, length)."""
    return Rotary.at(positions, theta, x.shape[-1])(x)


# ---------------------------------------------------------------------------------------------
# Layer stacking: parameters of N identical layers live in one tree with a leading 'layers' axis,
# and the forward runs them with lax.scan so compile time does not grow with depth.

RESIDUAL_NAME = "residual"  # checkpoint name of a decoder layer's residual stream after attention
_KEEP_ATTENTION = jax.checkpoint_policies.save_only_these_names(ATTENTION_NAME, RESIDUAL_NAME)

REMAT_POLICIES: dict[str, Callable | None] = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    # keeps attention outputs (and flash statistics) and residuals: the backward re-runs projections
    # and MLPs, never attention
    "attention": _KEEP_ATTENTION,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_attention": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _KEEP_ATTENTION),
    "dots_all": jax.checkpoint_policies.dots_saveable,
}


def stacked(make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, rngs: nnx.Rngs) -> nnx.Module:
    """Creates ``num_layers`` independently initialised layers stacked along a leading 'layers' axis."""
    keys = jax.random.split(rngs.params(), num_layers)
    layers = nnx.vmap(lambda key: make_layer(nnx.Rngs(params=key)), in_axes=0, out_axes=0)(keys)
    for _, variable in nnx.iter_graph(layers):
        if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
            variable.set_metadata(logical_axes=("layers",) + tuple(variable.get_metadata()["logical_axes"]))
    return layers


def unstacked(layers: nnx.Module) -> nnx.List:
    """The layers of a :func:`stacked` module as separate modules, each with its own arrays.

    How inference runs (an unrolled loop, as MaxText decodes with ``scan_layers=False``): a layer scan slices
    each layer's weights and cache out of the stacked arrays, and XLA's CPU backend copies every such slice
    before its matmuls, at every decode step (see the README's decode rows).
    """
    graphdef, state = nnx.split(layers)
    modules = []
    for i in range(jax.tree.leaves(state)[0].shape[0]):
        module = nnx.merge(graphdef, jax.tree.map(lambda a: a[i], state))
        for _, variable in nnx.iter_graph(module):
            if isinstance(variable, nnx.Variable) and "logical_axes" in variable.get_metadata():
                variable.set_metadata(logical_axes=tuple(variable.get_metadata()["logical_axes"])[1:])
        modules.append(module)
    return nnx.List(modules)


def run_stacked(
    layers: nnx.Module,
    body: Callable[[nnx.Module, Any, Any], tuple[Any, Any]],
    carry: Any,
    xs: Any = None,
    *,
    remat: str = "none",
    scan: bool = True,
) -> tuple[Any, Any]:
    """Runs ``body(layer, carry, x) -> (carry, y)`` over stacked ``layers`` (and per-layer ``xs``).

    ``scan=False`` unrolls a Python loop over the same parameters (for tests and debugging); ``layers``
    of :func:`unstacked` modules (inference) run unrolled, each layer on its own arrays, its ``xs`` with
    Python / numpy values as given (no remat: nothing is differentiated there). ``remat`` names a policy of
    :data:`REMAT_POLICIES` applied to each stacked layer.
    """
    if remat not in REMAT_POLICIES:
        raise ValueError(f"unknown remat policy {remat!r}; choose one of {sorted(REMAT_POLICIES)}")
    separate = isinstance(layers, nnx.List)
    graphdef, state = nnx.split(layers[0] if separate else layers)

    def step(carry, inputs):
        layer_state, x = inputs
        return body(nnx.merge(graphdef, layer_state), carry, x)

    if remat != "none" and not separate:
        step = jax.checkpoint(step, policy=REMAT_POLICIES[remat], prevent_cse=not scan)
    if scan and not separate:
        return jax.lax.scan(step, carry, (state, xs))
    num = len(layers) if separate else jax.tree.leaves(state)[0].shape[0]
    ys = []
    for i in range(num):
        layer_state = nnx.state(layers[i]) if separate else jax.tree.map(lambda a: a[i], state)
        carry, y = step(carry, (layer_state, jax.tree.map(lambda a: a[i], xs)))
        ys.append(y)
    stacked_ys = None if all(y is None for y in ys) else jax.tree.map(lambda *a: jnp.stack(a), *ys)
    return carry, stacked_ys


def gelu_tanh(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=True)


def gelu_exact(x: jax.Array) -> jax.Array:
    return jax.nn.gelu(x, approximate=False)
