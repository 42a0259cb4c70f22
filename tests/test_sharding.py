"""sharding.gathered: parameters as matmuls read them (FSDP's all-gather made explicit)."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from wings_jax import sharding


def test_gathered_keeps_only_the_tensor_parallel_split():
    mesh = sharding.make_mesh(data=1, fsdp=4, tensor=2, devices=jax.devices()[:8])
    axes = ("embed", "mlp")  # stored split over fsdp x tensor
    w = jax.device_put(jnp.arange(8 * 16, dtype=jnp.float32).reshape(8, 16),
                       NamedSharding(mesh, sharding.spec_for(axes)))
    assert w.sharding.spec == PartitionSpec("fsdp", "tensor")
    with sharding.activation_sharding(mesh):
        out = jax.jit(lambda w: sharding.gathered(w.astype(jnp.bfloat16), axes))(w)
        stacked = jax.jit(lambda w: sharding.gathered(w, ("layers",) + axes))(w[None])
    assert out.sharding.spec == PartitionSpec(None, "tensor") and out.dtype == jnp.bfloat16
    assert stacked.sharding.spec == PartitionSpec(None, None, "tensor")
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(w))
    assert sharding.gathered(w, axes) is w  # outside activation_sharding: untouched
