"""The one-call trunk builds its graph inside jit: rotation and translation equivariant with
k-NN and radius graphs (float64), padding ignored, an overflowing budget loud (NaN outputs)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.initialisation import init_params
from se3jax.point_cloud_trunk import PointCloudTrunk
from se3jax.testing import assert_equivariant

N = 16
GRAPHS = {"knn": dict(graph="knn", k=5), "radius": dict(graph="radius", cutoff=2.5, max_neighbours=15, bin_capacity=16)}


def make(dtype=jnp.float64, **graph):
    trunk = PointCloudTrunk(
        Fiber({0: 2, 1: 1}), Fiber.create(2, 4), Fiber({0: 1, 1: 1}), num_layers=1, num_heads=2,
        execution=Execution(precision="fp64" if dtype == jnp.float64 else "fp32"), **graph,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    points = jnp.asarray(rng.normal(size=(N, 3)) * 1.5, dtype)
    features = {0: jnp.asarray(rng.normal(size=(N, 2, 1)), dtype), 1: jnp.asarray(rng.normal(size=(N, 1, 3)), dtype)}
    params = init_params(trunk, jax.random.PRNGKey(0), features, points)
    return trunk, params, points, features


@pytest.mark.parametrize("graph", sorted(GRAPHS))
def test_one_call_trunk_is_equivariant(graph, rotations, x64):
    trunk, params, points, features = make(**GRAPHS[graph])
    _, state = jax.jit(lambda: trunk.apply(params, features, points, mutable="intermediates"))()
    built = state["intermediates"]["graph"][0]
    assert int(built.overflow) == 0 and int(built.mask.sum()) > 2 * N
    fn = jax.jit(lambda x, f: trunk.apply(params, f, x))
    assert_equivariant(fn, points, features, rotations[:3], rtol=1e-9, translation=jnp.array([0.3, -1.0, 2.0]))


def test_padding_is_ignored_and_overflow_is_loud():
    trunk, params, points, features = make(jnp.float32, **GRAPHS["radius"])
    out = jax.jit(trunk.apply)(params, features, points)
    pad = lambda x, value: jnp.concatenate([x, jnp.full((4,) + x.shape[1:], value, x.dtype)])
    padded = jax.jit(trunk.apply)(
        params, {d: pad(x, 0.0) for d, x in features.items()}, pad(points, 0.1), jnp.arange(N + 4) < N
    )  # padding points sit among the real ones
    for d in out:
        np.testing.assert_allclose(padded[d][:N], out[d], rtol=1e-5, atol=1e-6)
    small = trunk.clone(max_neighbours=2)  # the same parameters fit: the budget is no parameter
    assert all(bool(jnp.isnan(x).all()) for x in jax.jit(small.apply)(params, features, points).values())
