"""The trunk as a building block for other models: any input and output degrees, one degree,
every execution choice, padding, and composition with jit / vmap / grad / remat.

Tolerances as in tests/test_layers.py: float64 at rounding level (1e-9), float32 1e-5; bf16
rounds every contraction to 8 bits (~4e-3 each), which compounds over two layers to ~1e-2."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.initialisation import init_params
from se3jax.model import SE3Transformer
from se3jax.point_clouds import radius_graph
from se3jax.testing import assert_equivariant, random_rotations, relative_error, rotate_features

# one xdist worker runs this module: its tests share module-level fixtures and caches
pytestmark = pytest.mark.xdist_group("test_trunk")

NUM_POINTS = 14


def cloud(seed=0, dtype=jnp.float64):
    points = jnp.asarray(np.random.default_rng(seed).normal(size=(NUM_POINTS, 3)) * 1.5, dtype)
    graph = jax.jit(lambda p: radius_graph(p, cutoff=3.0, max_neighbours=NUM_POINTS - 1))(points)  # one program
    assert int(graph.overflow) == 0 and int(graph.mask.sum()) > 20
    return points, graph


def features_for(fiber: Fiber, dtype, seed=1):
    rng = np.random.default_rng(seed)
    return {d: jnp.asarray(rng.normal(size=(NUM_POINTS, c, 2 * d + 1)), dtype) for d, c in fiber}


def trunk_fn(trunk, params, graph, max_degree):
    def fn(positions, features):
        edges = edge_inputs(positions, graph.senders, graph.receivers, max_degree, mask=graph.mask)
        return trunk.apply(params, features, edges)

    return jax.jit(fn)


FIBERS = {  # (in, hidden, out, max degree of the edge harmonics)
    "scalars_and_vectors_to_vectors_and_tensors": (Fiber({0: 3, 1: 2}), Fiber.create(3, 4), Fiber({1: 1, 2: 1}), 2),
    "one_vector_degree_to_vectors": (Fiber({1: 2}), Fiber.create(2, 4), Fiber({1: 1}), 1),
    "tensor_input_to_scalars_and_tensors": (Fiber({2: 1}), Fiber.create(3, 4), Fiber({0: 2, 2: 1}), 2),
}


@pytest.mark.parametrize("name", sorted(FIBERS))
def test_trunk_equivariant_float64(name, rotations, x64):
    fiber_in, hidden, fiber_out, max_degree = FIBERS[name]
    points, graph = cloud()
    trunk = SE3Transformer(
        fiber_in, hidden, fiber_out, num_layers=2, num_heads=2, execution=Execution(precision="fp64", paired_edges=True)
    )
    features = features_for(fiber_in, jnp.float64)
    params = init_params(
        trunk,
        jax.random.PRNGKey(0),
        features,
        edge_inputs(points, graph.senders, graph.receivers, max_degree, mask=graph.mask),
    )
    assert_equivariant(
        trunk_fn(trunk, params, graph, max_degree),
        points,
        features,
        rotations,
        rtol=1e-9,
        translation=jnp.array([1.0, -2.0, 0.5]),
    )


# Each choice next to an explicit, different path (on a CPU ``auto`` resolves to ``none``, so
# ``none`` is compared with ``full``); precisions against fp32 on the same (auto) path.
EXECUTIONS = [
    (dict(fuse_level="none"), dict(fuse_level="full")),
    (dict(fuse_level="partial_out"), dict(fuse_level="none")),
    (dict(fuse_level="partial_in"), dict(fuse_level="none")),
    (dict(fuse_level="full"), dict(fuse_level="none")),
    (dict(low_memory=True, fuse_level="full"), dict(fuse_level="none")),
    (dict(edge_chunk=16, remat="off", fuse_level="none"), dict(fuse_level="full")),
    (dict(precision="tf32"), dict()),
    (dict(precision="bf16"), dict()),
    (dict(paired_edges=False, fuse_level="none"), dict(fuse_level="full")),
]
_OUTPUTS = {}  # the vector-fiber trunk's outputs per execution (references are shared)


def vector_trunk(**execution) -> SE3Transformer:
    """The scalars-and-vectors trunk under ``execution`` (se3jax.execution.Execution fields)."""
    fiber_in, hidden, fiber_out, _ = FIBERS["scalars_and_vectors_to_vectors_and_tensors"]
    return SE3Transformer(fiber_in, hidden, fiber_out, num_layers=2, num_heads=2, execution=Execution(**execution))


@functools.cache
def vector_trunk_inputs():
    """Its float32 cloud, features, and parameters (initialised once: every execution shares them)."""
    fiber_in, _, _, max_degree = FIBERS["scalars_and_vectors_to_vectors_and_tensors"]
    points, graph = cloud(dtype=jnp.float32)
    features = features_for(fiber_in, jnp.float32)
    edges = edge_inputs(points, graph.senders, graph.receivers, max_degree, mask=graph.mask)
    params = init_params(vector_trunk(), jax.random.PRNGKey(0), features, edges)
    return points, graph, features, params


def vector_trunk_fn(execution: dict):
    """The jitted (positions, features) -> outputs of the vector trunk with ``execution``, its
    parameters shared by every execution, and its inputs."""
    points, graph, features, params = vector_trunk_inputs()
    max_degree = FIBERS["scalars_and_vectors_to_vectors_and_tensors"][3]
    return trunk_fn(vector_trunk(**execution), params, graph, max_degree), points, features


def vector_trunk_outputs(execution: dict):
    key = tuple(sorted(execution.items()))
    if key not in _OUTPUTS:
        fn, points, features = vector_trunk_fn(execution)
        _OUTPUTS[key] = fn(points, features)
    return _OUTPUTS[key]


@pytest.mark.parametrize(
    "execution,reference", EXECUTIONS, ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) or "default"
)
def test_every_execution_choice_on_vector_fibers(execution, reference, rotations, precision_rtol):
    """Equivariant, and the same function as another plan (parameters shared), within the
    precision's tolerance on this backend."""
    rtol = precision_rtol(execution.get("precision", "fp32"))
    expected = vector_trunk_outputs(reference)
    fn, points, features = vector_trunk_fn(execution)
    out = fn(points, features)
    for d in expected:
        assert relative_error(out[d], expected[d]) < rtol, d
    assert_equivariant(fn, points, features, rotations[:3], rtol=rtol)


def test_padding_points_change_nothing_and_stay_finite(debug_nans):
    fiber_in, hidden, fiber_out, max_degree = FIBERS["one_vector_degree_to_vectors"]
    points, _ = cloud(dtype=jnp.float32)
    padded = jnp.concatenate([points, jnp.zeros((6, 3))])  # 6 padding points at the origin
    mask = jnp.arange(padded.shape[0]) < NUM_POINTS
    graph = radius_graph(padded, cutoff=3.0, max_neighbours=NUM_POINTS, mask=mask)
    features = {1: jnp.concatenate([features_for(fiber_in, jnp.float32)[1], jnp.zeros((6, 2, 3))])}
    trunk = SE3Transformer(fiber_in, hidden, fiber_out, num_layers=2, num_heads=2)

    def run(params, positions):
        edges = edge_inputs(positions, graph.senders, graph.receivers, max_degree, mask=graph.mask)
        return trunk.apply(params, features, edges)[1]

    edges = edge_inputs(padded, graph.senders, graph.receivers, max_degree, mask=graph.mask)
    params = init_params(trunk, jax.random.PRNGKey(0), features, edges)
    out = jax.jit(run)(params, padded)
    moved = jax.jit(run)(params, padded.at[NUM_POINTS:].set(5.0))  # padding points elsewhere
    np.testing.assert_allclose(out[:NUM_POINTS], moved[:NUM_POINTS], rtol=1e-6, atol=1e-7)
    grads = jax.jit(jax.grad(lambda p: jnp.sum(run(params, p)[:NUM_POINTS] ** 2)))(padded)
    assert bool(jnp.all(jnp.isfinite(grads))) and float(jnp.abs(grads[NUM_POINTS:]).max()) == 0.0


def test_trunk_composes_with_vmap_grad_and_remat():
    fiber_in, hidden, fiber_out, max_degree = FIBERS["one_vector_degree_to_vectors"]
    clouds = [cloud(seed, jnp.float32) for seed in (0, 1)]
    features = features_for(fiber_in, jnp.float32)
    trunk = nn.remat(SE3Transformer)(fiber_in, hidden, fiber_out, num_layers=2, num_heads=2)
    points = jnp.stack([c[0] for c in clouds])
    graphs = jax.tree.map(lambda *x: jnp.stack(x), *[c[1] for c in clouds])

    def one(params, positions, graph, feats=features):
        edges = edge_inputs(positions, graph.senders, graph.receivers, max_degree, mask=graph.mask)
        return trunk.apply(params, feats, edges)[1]

    params = init_params(
        trunk,
        jax.random.PRNGKey(0),
        features,
        edge_inputs(points[0], clouds[0][1].senders, clouds[0][1].receivers, max_degree, mask=clouds[0][1].mask),
    )
    batched = jax.jit(jax.vmap(one, in_axes=(None, 0, 0)))(params, points, graphs)
    for k in range(2):
        np.testing.assert_allclose(batched[k], jax.jit(one)(params, points[k], clouds[k][1]), rtol=1e-5, atol=1e-6)
    # gradients with respect to positions: an invariant's gradient rotates with the points
    # (and the input vectors rotate with them)
    energy = lambda p, feats: jnp.sum(jnp.sum(one(params, p, clouds[0][1], feats) ** 2, axis=-1))
    rotation = jnp.asarray(random_rotations(np.random.default_rng(3), 1)[0], jnp.float32)
    force = jax.jit(jax.grad(energy))
    g = force(points[0], features)
    g_rot = force(points[0] @ rotation.T, rotate_features(features, rotation))
    assert relative_error(g_rot, g @ rotation.T) < 1e-4
