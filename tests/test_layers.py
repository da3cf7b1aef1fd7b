"""Every layer is SE(3)-equivariant, and every fusion level computes the same function.

Tolerances: float64 runs must be equivariant to rounding level (<= 1e-9 relative). Float32
runs use 1e-5 relative: float32 epsilon is 1.2e-7 and a layer sums O(10^3) terms per output,
so rounding alone reaches a few 1e-6 while a real equivariance bug gives O(1) errors.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.edges import edge_inputs
from se3jax.execution import Execution, FuseLevel, allowed_levels
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.initialisation import init_params
from se3jax.layers import AttentionBlockSE3, ConvSE3, LinearSE3, NormSE3
from se3jax.layers.convolution import channels_last_messages
from se3jax.layers.fused_kernel import reference_messages
from se3jax.precision import get_policy
from se3jax.testing import assert_equivariant, relative_error

MAX_DEGREE = 3
UNIFORM = Fiber.create(4, 4)
RAGGED_IN, RAGGED_OUT = Fiber({0: 3, 1: 2, 3: 2}), Fiber({0: 2, 2: 3})
LEVELS = [FuseLevel.NONE, FuseLevel.PARTIAL_OUT, FuseLevel.PARTIAL_IN, FuseLevel.FULL]


def random_features(fiber: Fiber, num_nodes: int, dtype, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    return {d: jnp.asarray(rng.normal(size=(num_nodes, c, 2 * d + 1)), dtype) for d, c in fiber}


def graph_edges(graphs, positions):
    """The layers' edge inputs, recomputed from ``positions`` (so they carry the rotation)."""
    return edge_inputs(
        positions,
        graphs.senders,
        graphs.receivers,
        MAX_DEGREE,
        graphs.edges[FEATURES].astype(positions.dtype),
        padding_masks(graphs).edges,
    )


def graph_layer_fn(module, params, graphs):
    """(positions, features) -> module outputs, recomputing edge inputs from positions."""
    return jax.jit(lambda positions, features: module.apply(params, features, graph_edges(graphs, positions)))


_INITIALISED = {}  # (layer, dtype, graphs) -> its parameters and inputs, shared by every level


def init_graph_layer(layer, graphs, dtype):
    """A graph layer's parameters, positions and input features. Initialised once per layer
    and dtype, at level ``none``: every fusion level has the same parameters (one canonical
    radial kernel; tests/test_execution.py checks it), so each level's test reuses them."""
    key = (layer, jnp.dtype(dtype).name, id(graphs))
    if key not in _INITIALISED:
        module = GRAPH_LAYERS[layer](FuseLevel.NONE, "fp64" if dtype == jnp.float64 else "fp32")
        positions = jnp.asarray(graphs.nodes[POSITIONS], dtype)
        features = random_features(FIBER_IN[layer], positions.shape[0], dtype)
        params = init_params(module, jax.random.PRNGKey(0), features, graph_edges(graphs, positions))
        _INITIALISED[key] = params, positions, features
    return _INITIALISED[key]


def run(level, precision, **options):
    return Execution(fuse_level=level, precision=precision, paired_edges=False).replace(**options)


GRAPH_LAYERS = {
    "conv_uniform": lambda level, p: ConvSE3(UNIFORM, UNIFORM, execution=run(level, p)),
    "conv_ragged_self_interaction": lambda level, p: ConvSE3(
        RAGGED_IN, RAGGED_OUT, self_interaction="per_edge", execution=run(level, p)
    ),
    "conv_chunked": lambda level, p: ConvSE3(UNIFORM, UNIFORM, execution=run(level, p, edge_chunk=40)),
    "conv_paired_chunked": lambda level, p: ConvSE3(
        UNIFORM, UNIFORM, execution=run(level, p, edge_chunk=40, paired_edges=True)
    ),
    "attention": lambda level, p: AttentionBlockSE3(UNIFORM, Fiber.create(4, 8), num_heads=2, execution=run(level, p)),
    "attention_first_layer": lambda level, p: AttentionBlockSE3(
        Fiber({0: 6}), Fiber.create(4, 8), num_heads=2, execution=run(level, p)
    ),
}
FIBER_IN = {
    "conv_uniform": UNIFORM,
    "conv_ragged_self_interaction": RAGGED_IN,
    "conv_chunked": UNIFORM,
    "conv_paired_chunked": UNIFORM,
    "attention": UNIFORM,
    "attention_first_layer": Fiber({0: 6}),
}


FIBER_OUT = {
    "conv_uniform": UNIFORM,
    "conv_ragged_self_interaction": RAGGED_OUT,
    "conv_chunked": UNIFORM,
    "conv_paired_chunked": UNIFORM,
    "attention": Fiber.create(4, 8),
    "attention_first_layer": Fiber.create(4, 8),
}
# each layer at the levels its fibers allow: any other level falls back to one of these and
# would compute the same function again (ragged fibers allow only ``none``)
LAYER_LEVELS = [
    (layer, level)
    for layer in sorted(GRAPH_LAYERS)
    for level in LEVELS
    if level in allowed_levels(FIBER_IN[layer], FIBER_OUT[layer])
]


@pytest.mark.parametrize("layer,level", LAYER_LEVELS, ids=lambda x: x.value if isinstance(x, FuseLevel) else x)
def test_graph_layers_equivariant_float64(layer, level, small_batch, rotations, x64):
    module = GRAPH_LAYERS[layer](level, "fp64")
    params, positions, features = init_graph_layer(layer, small_batch, jnp.float64)
    fn = graph_layer_fn(module, params, small_batch)
    assert_equivariant(fn, positions, features, rotations, rtol=1e-9, translation=jnp.array([0.3, -2.0, 1.5]))


@pytest.mark.parametrize("layer", ["conv_uniform", "attention"])
def test_graph_layers_equivariant_float32(layer, small_batch, rotations):
    module = GRAPH_LAYERS[layer](FuseLevel.AUTO, "fp32")
    params, positions, features = init_graph_layer(layer, small_batch, jnp.float32)
    fn = graph_layer_fn(module, params, small_batch)
    assert_equivariant(fn, positions, features, rotations, rtol=1e-5)


@pytest.mark.parametrize(
    "module,fiber",
    [
        (LinearSE3(UNIFORM, Fiber({0: 3, 1: 5, 3: 2})), UNIFORM),
        (NormSE3(UNIFORM), UNIFORM),
    ],
)
def test_node_layers_equivariant_float64(module, fiber, rotations, x64):
    features = random_features(fiber, 6, jnp.float64)
    params = module.init(jax.random.PRNGKey(0), features)
    fn = jax.jit(lambda positions, feats: module.apply(params, feats))
    assert_equivariant(fn, jnp.zeros((6, 3)), features, rotations, rtol=1e-9)


@pytest.mark.parametrize("layer", ["conv_uniform", "conv_ragged_self_interaction", "attention", "conv_paired_chunked"])
def test_fusion_levels_agree_values_and_gradients(layer, small_batch):
    """Same parameters at every level (one canonical kernel) and with either XLA contraction
    layout -> same outputs and gradients. The reference is level ``none`` with the plain
    ``xla`` contraction; every level runs with ``auto`` (on this CPU: ``xla_channels_last``)."""
    params, positions, features = init_graph_layer(layer, small_batch, jnp.float32)

    def outputs_and_grads(level, kernel="auto"):
        module = GRAPH_LAYERS[layer](level, "fp32")
        module = module.clone(execution=module.execution.replace(kernel=kernel))

        def loss(params, positions, features):
            out = module.apply(params, features, graph_edges(small_batch, positions))
            return sum(jnp.sum(jnp.sin(v)) for v in out.values()), out

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))(params, positions, features)

    (_, ref_out), ref_grads = outputs_and_grads(FuseLevel.NONE, "xla")
    for level in allowed_levels(FIBER_IN[layer], FIBER_OUT[layer]):  # any other falls back to one of these
        (_, out), grads = outputs_and_grads(level)
        for d in ref_out:
            assert relative_error(out[d], ref_out[d]) < 1e-5, (level, d)
        for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
            assert g.shape == g_ref.shape
            assert relative_error(g, g_ref) < 1e-4, level


def test_allowed_levels_follow_the_fibers():
    assert set(allowed_levels(UNIFORM, UNIFORM)) == {
        FuseLevel.NONE,
        FuseLevel.PARTIAL_OUT,
        FuseLevel.PARTIAL_IN,
        FuseLevel.FULL,
    }
    assert allowed_levels(Fiber({0: 6}), Fiber({0: 32, 1: 16})) == (FuseLevel.NONE,)
    assert FuseLevel.PARTIAL_OUT in allowed_levels(UNIFORM, Fiber({0: 128}))


def test_conv_rejects_features_of_the_wrong_fiber(small_batch):
    module = GRAPH_LAYERS["conv_uniform"](FuseLevel.NONE, "fp32")
    params, positions, features = init_graph_layer("conv_uniform", small_batch, jnp.float32)
    fn = graph_layer_fn(module, params, small_batch)
    bad = dict(features)
    bad[2] = bad[2][:, :3]
    with pytest.raises(ValueError, match=r"input\[2\] has shape"):
        fn(positions, bad)


@pytest.mark.parametrize("precision,tolerance", [("fp64", 1e-12), ("fp32", 1e-6), ("bf16", 1e-2)])
def test_channels_last_contraction_is_the_reference_with_its_derivatives(precision, tolerance, request):
    """``xla_channels_last`` computes the reference contraction in another layout: the same
    values, reverse- and forward-mode derivatives, and second derivatives (forces trained on).
    Tolerances: fp64 and fp32 only sum in another order (a few ulps of the largest term); bf16
    may round a radial weight to the neighbouring bfloat16 (2^-8 relative)."""
    if precision == "fp64":
        request.getfixturevalue("x64")
    policy = get_policy(precision)
    real = jnp.float64 if precision == "fp64" else jnp.float32
    rng = np.random.default_rng(0)
    h, w, t = (jnp.asarray(rng.normal(size=shape), real) for shape in ((11, 8), (8, 5 * 12), (11, 2, 12, 3)))
    h, t = h.astype(policy.compute_dtype), t.astype(policy.compute_dtype)
    flipped = w.reshape(8, 5, 12).transpose(0, 2, 1).reshape(8, 60)  # [mid, (j, o)]
    contractions = (reference_messages, lambda h, w, t, p: channels_last_messages(h, w, t, p, flipped))
    values = [f(h, w, t, policy) for f in contractions]
    assert relative_error(values[1], values[0]) < tolerance
    cotangent = jnp.asarray(rng.normal(size=values[0].shape), values[0].dtype)
    grads = [jax.vjp(lambda *a, f=f: f(*a, policy), h, w, t)[1](cotangent) for f in contractions]
    tangents = tuple(jnp.asarray(rng.normal(size=x.shape), x.dtype) for x in (h, w, t))
    jvps = [jax.jvp(lambda *a, f=f: f(*a, policy), (h, w, t), tangents)[1] for f in contractions]
    second = [  # d/dh of <cotangent, d msg/dt . t>: reverse over reverse, as force training does
        jax.grad(lambda h, f=f: jnp.vdot(jax.vjp(lambda t: f(h, w, t, policy), t)[1](cotangent)[0], t).real)(h)
        for f in contractions
    ]
    for a, b in [*zip(grads[1], grads[0]), (jvps[1], jvps[0]), (second[1], second[0])]:
        assert a.dtype == b.dtype and relative_error(a, b) < tolerance
