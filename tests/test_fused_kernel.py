"""The Pallas kernel that fuses the radial weights into the TFN contraction computes the same
messages and gradients as the einsum path, in every precision (interpret mode on CPUs), and a
convolution running it is equivariant."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.layers import ConvSE3
from se3jax.layers.fused_kernel import fused_messages, reference_messages
from se3jax.precision import get_policy
from se3jax.testing import assert_equivariant, relative_error

# bf16 keeps 8 mantissa bits, fp16 11: the two paths round in different places
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-5, "bf16": 3e-2, "fp16": 4e-3}


def inputs(rows, s, seed=0, m=32, o=8, j=12, k=5):
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(rows, m)), jnp.float32),
        jnp.asarray(rng.normal(size=(m, o * j)) / np.sqrt(m), jnp.float32),
        jnp.asarray(rng.normal(size=(rows, s, j, k)), jnp.float32),
    )


@pytest.mark.parametrize("precision", sorted(TOLERANCE))
@pytest.mark.parametrize("rows,s", [(100, 2), (37, 1)])  # paired bonds / unpaired edges; ragged tiles
def test_fused_messages_and_gradients_match_the_einsum_path(precision, rows, s):
    policy = get_policy(precision)
    h, w, t = inputs(rows, s)
    fused = fused_messages(h, w, t, policy, tile_rows=16)
    reference = reference_messages(h, w, t, policy)
    assert fused.shape == (rows, s, 8, 5) and fused.dtype == jnp.float32
    assert relative_error(fused, reference) < TOLERANCE[precision]
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=fused.shape), jnp.float32)
    loss = lambda fn: lambda *a: jnp.sum(fn(*a, policy) * cotangent)
    g_fused = jax.grad(loss(lambda *a: fused_messages(*a[:3], a[3], tile_rows=16)), argnums=(0, 1, 2))(h, w, t)
    g_ref = jax.grad(loss(reference_messages), argnums=(0, 1, 2))(h, w, t)
    for a, b in zip(g_fused, g_ref):
        assert a.shape == b.shape and relative_error(a, b) < 2 * TOLERANCE[precision]


def conv_edges(graphs, positions):
    return edge_inputs(
        positions,
        graphs.senders,
        graphs.receivers,
        3,
        graphs.edges[FEATURES].astype(positions.dtype),
        padding_masks(graphs).edges,
    )


def test_convolution_with_the_kernel_is_equivariant_and_equal(small_batch, rotations, x64):
    fiber = Fiber.create(4, 4)
    positions = jnp.asarray(small_batch.nodes[POSITIONS], jnp.float64)
    features = {
        d: jnp.asarray(np.random.default_rng(d).normal(size=(positions.shape[0], 4, 2 * d + 1))) for d in range(4)
    }
    fused = ConvSE3(fiber, fiber, execution=Execution(precision="fp64", kernel="pallas", fuse_level="partial_out"))
    params = fused.init(jax.random.PRNGKey(0), features, conv_edges(small_batch, positions))
    fn = jax.jit(lambda p, f: fused.apply(params, f, conv_edges(small_batch, p)))
    assert_equivariant(fn, positions, features, rotations[:3], rtol=1e-9)
    einsum = ConvSE3(fiber, fiber, execution=Execution(precision="fp64", kernel="xla", fuse_level="partial_out"))
    expected = einsum.apply(params, features, conv_edges(small_batch, positions))
    for d in expected:
        assert relative_error(fn(positions, features)[d], expected[d]) < 1e-12
