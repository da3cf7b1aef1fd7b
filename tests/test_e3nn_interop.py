"""e3nn-jax in and out: exact round trips, e3nn's D matrices rotate the IrrepsArray exactly as
se3jax rotates its features (same basis and m order), and e3nn layer -> trunk -> e3nn layer is
rotation equivariant under e3nn's own rotations (float64)."""

import e3nn_jax as e3nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.e3nn_interop import features_to_irreps_array, fiber_to_irreps, irreps_array_to_features, irreps_to_fiber
from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.model import SE3Transformer
from se3jax.point_clouds import radius_graph
from se3jax.testing import random_rotations, relative_error, rotate_features


def random_features(rng, fiber, lead=(6,)):
    return {d: jnp.asarray(rng.normal(size=lead + (c, 2 * d + 1))) for d, c in fiber}


def test_round_trips_are_exact_and_parity_is_natural():
    rng = np.random.default_rng(0)
    fiber = Fiber({0: 3, 1: 2, 2: 1, 3: 2})
    features = random_features(rng, fiber, lead=(4, 5))
    x = features_to_irreps_array(features)
    assert x.irreps == e3nn.Irreps("3x0e+2x1o+1x2e+2x3o") == fiber_to_irreps(fiber) and x.shape == (4, 5, 28)
    back = irreps_array_to_features(x)
    assert set(back) == set(features) and all(np.array_equal(back[d], features[d]) for d in features)
    # in: any order, any parity (dropped), same l concatenated in order, zero chunks as zeros
    y = e3nn.IrrepsArray("1x1o+2x0e+1x1e", jnp.asarray(rng.normal(size=(7, 8))))
    f = irreps_array_to_features(y)
    assert irreps_to_fiber(y.irreps) == Fiber({0: 2, 1: 2})
    np.testing.assert_array_equal(f[1][:, 0], y.array[:, :3])
    np.testing.assert_array_equal(f[1][:, 1], y.array[:, 5:])
    np.testing.assert_array_equal(f[0][:, :, 0], y.array[:, 3:5])
    zeros = e3nn.zeros("2x2e", (3,))
    assert irreps_array_to_features(zeros)[2].shape == (3, 2, 5)
    with pytest.raises(ValueError, match="must be"):
        features_to_irreps_array({1: jnp.zeros((3, 2, 5))})


def test_e3nn_rotation_of_the_array_is_the_se3jax_rotation_of_the_features(x64):
    rng = np.random.default_rng(1)
    features = random_features(rng, Fiber({0: 2, 1: 3, 2: 2, 3: 1}))

    @jax.jit  # one program (e3nn's D matrices, op by op, compiled ~150 primitives one by one)
    def both_ways(rotation):
        via_e3nn = features_to_irreps_array(features).transform_by_matrix(rotation)
        return via_e3nn.array, features_to_irreps_array(rotate_features(features, rotation)).array

    for rotation in random_rotations(rng, 2):
        rotation = jnp.asarray(rotation)
        via_e3nn, via_se3jax = both_ways(rotation)
        np.testing.assert_allclose(via_e3nn, via_se3jax, atol=1e-12)
    # degree 1 is (x, y, z): a vector rotates as one
    vector = jnp.asarray(rng.normal(size=(1, 1, 3)))
    rotated = features_to_irreps_array({1: vector}).transform_by_matrix(rotation).array
    np.testing.assert_allclose(rotated, vector[:, 0] @ rotation.T, atol=1e-12)


def test_e3nn_layer_trunk_e3nn_layer_is_equivariant_under_e3nn_rotations(x64):
    rng = np.random.default_rng(2)
    points = jnp.asarray(rng.normal(size=(10, 3)) * 1.5)
    graph = radius_graph(points, cutoff=3.0, max_neighbours=9)
    inputs = e3nn.IrrepsArray("3x0e+2x1o", jnp.asarray(rng.normal(size=(10, 9))))
    first = e3nn.flax.Linear("4x0e+2x1o")
    trunk = SE3Transformer(
        Fiber({0: 4, 1: 2}), Fiber.create(2, 4), Fiber({0: 2, 1: 1}), num_layers=1, num_heads=2,
        execution=Execution(precision="fp64"),
    )  # fmt: skip
    last = e3nn.flax.Linear("1x0e+1x1o")
    edges = lambda p: edge_inputs(p, graph.senders, graph.receivers, 1, mask=graph.mask)

    def mix(y):
        return e3nn.concatenate([y, e3nn.tensor_product(y, y, filter_ir_out="0e+1o")])

    @jax.jit
    def init(key):  # one compiled call (eager Flax init of the trunk dispatches op by op)
        k1, k2, k3 = jax.random.split(key, 3)
        params_first = first.init(k1, inputs)
        hidden = irreps_array_to_features(first.apply(params_first, inputs))
        params_trunk = trunk.init(k2, hidden, edges(points))
        y = features_to_irreps_array(trunk.apply(params_trunk, hidden, edges(points)))
        return params_first, params_trunk, last.init(k3, mix(y))

    params_first, params_trunk, params_last = init(jax.random.PRNGKey(0))

    @jax.jit
    def model(positions, x):
        h = irreps_array_to_features(first.apply(params_first, x))
        y = features_to_irreps_array(trunk.apply(params_trunk, h, edges(positions)))
        return last.apply(params_last, mix(y))

    reference = model(points, inputs)
    assert reference.irreps == e3nn.Irreps("1x0e+1x1o") and float(jnp.abs(reference.array).max()) > 0
    for key in jax.random.split(jax.random.PRNGKey(3), 3):
        rotation = e3nn.rand_matrix(key, (), dtype=jnp.float64)  # e3nn's random proper rotation
        moved = model(points @ rotation.T + 0.7, inputs.transform_by_matrix(rotation))
        assert relative_error(moved.array, reference.transform_by_matrix(rotation).array) < 1e-9
