"""The whole model: equivariance, invariances, execution modes that must not change results,
finite gradients with padding, and clear errors for bad input.

A reduced model (2 layers, degrees 0-2 of 8 channels, 2 heads) keeps the suite fast; it
exercises every code path of the QM9 network (first ragged layer, hidden fused layers, output
conv, pooling). Degree 3 (the QM9 model's highest) is checked by the float64 trunk test.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.basis import edge_geometry
from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, PaddingBudget, pad_to_budget, padding_masks
from se3jax.initialisation import init_params
from se3jax.model import SE3Transformer, SE3TransformerPooled
from se3jax.testing import assert_equivariant, relative_error, synthetic_molecule

# one xdist worker runs this module: its tests share module-level fixtures and caches
pytestmark = pytest.mark.xdist_group("test_model")

SMALL = dict(num_layers=2, num_degrees=3, num_channels=8, num_heads=2)


def small_model(**execution):
    """The reduced model with execution options (se3jax.execution.Execution fields)."""
    return SE3TransformerPooled(**SMALL, execution=Execution(**execution))


def with_positions(graphs, positions):
    return graphs._replace(nodes={**graphs.nodes, POSITIONS: positions})


def cast_floats(graphs, dtype):
    return jax.tree.map(lambda x: x.astype(dtype) if np.issubdtype(x.dtype, np.floating) else x, graphs)


@pytest.fixture(scope="module")
def model_and_params(small_batch):
    model = small_model()
    return model, init_params(model, jax.random.PRNGKey(0), small_batch)


def test_trunk_equivariant_float64_all_degrees(small_batch, rotations, x64):
    """Trunk with outputs of degrees 0..2: invariant scalars, D(R)-rotating vectors/tensors."""
    trunk = SE3Transformer(
        Fiber({0: 6}),
        Fiber.create(4, 8),
        Fiber({0: 3, 1: 2, 2: 2}),
        num_layers=2,
        num_heads=2,
        execution=Execution(precision="fp64"),
    )
    graphs = cast_floats(small_batch, jnp.float64)
    edge_mask = padding_masks(graphs).edges

    def fn(positions, features):
        edges = edge_inputs(positions, graphs.senders, graphs.receivers, 3, graphs.edges[FEATURES], edge_mask)
        return trunk.apply(params, features, edges)

    features = {0: graphs.nodes[FEATURES][:, :, None]}
    positions = graphs.nodes[POSITIONS]
    params = init_params(
        trunk,
        jax.random.PRNGKey(1),
        features,
        edge_inputs(positions, graphs.senders, graphs.receivers, 3, graphs.edges[FEATURES], edge_mask),
    )
    assert_equivariant(jax.jit(fn), positions, features, rotations, rtol=1e-9, translation=jnp.array([5.0, -1.0, 2.0]))


def pooled_fn(model, params, graphs):
    return jax.jit(
        lambda positions, features: {0: model.apply(params, with_positions(graphs, positions))[:, None, None]}
    )


def test_pooled_model_invariant_float64(small_batch, rotations, x64):
    graphs = cast_floats(small_batch, jnp.float64)
    model = small_model(precision="fp64")
    params = init_params(model, jax.random.PRNGKey(0), graphs)
    assert_equivariant(
        pooled_fn(model, params, graphs),
        graphs.nodes[POSITIONS],
        {},
        rotations,
        rtol=1e-9,
        translation=jnp.array([10.0, 3.0, -7.0]),
    )


def test_pooled_model_invariant_float32(model_and_params, small_batch, rotations):
    model, params = model_and_params
    assert_equivariant(
        pooled_fn(model, params, small_batch),
        jnp.asarray(small_batch.nodes[POSITIONS]),
        {},
        rotations,
        rtol=1e-5,
        translation=jnp.array([10.0, 3.0, -7.0]),
    )


def _molecules(seed=3, sizes=(5, 9, 7)):
    rng = np.random.default_rng(seed)
    return [synthetic_molecule(rng, n, num_rings=1) for n in sizes]


def _permute_nodes(graph, perm):
    """Relabel a single molecule's nodes by ``perm`` (new node k = old node perm[k])."""
    inverse = np.argsort(perm)
    return graph._replace(
        nodes=jax.tree.map(lambda x: x[perm], graph.nodes),
        senders=inverse[graph.senders].astype(np.int32),
        receivers=inverse[graph.receivers].astype(np.int32),
    )


def test_permutation_and_padding_invariance(model_and_params):
    model, params = model_and_params
    apply = jax.jit(model.apply)
    mols = _molecules()
    budget_a, budget_b = PaddingBudget(32, 80, 4), PaddingBudget(64, 128, 9)
    out_a = apply(params, pad_to_budget(mols, budget_a))[:3]
    out_b = apply(params, pad_to_budget(mols, budget_b))[:3]
    np.testing.assert_allclose(out_a, out_b, rtol=1e-6, atol=1e-6)

    rng = np.random.default_rng(0)
    permuted = [_permute_nodes(m, rng.permutation(int(m.n_node[0]))) for m in mols]
    # permute atoms within molecules, reorder edges, and reorder the molecules in the batch
    permuted = [
        p._replace(senders=p.senders[::-1], receivers=p.receivers[::-1], edges=jax.tree.map(lambda x: x[::-1], p.edges))
        for p in permuted
    ]
    out_p = apply(params, pad_to_budget([permuted[2], permuted[0], permuted[1]], budget_a))
    np.testing.assert_allclose(out_p[jnp.array([1, 2, 0])], out_a, rtol=1e-5, atol=1e-6)
    assert float(jnp.std(out_a)) > 0  # molecules are distinguished


def _value_and_grad(model, params, graphs):
    loss = lambda p, pos: jnp.sum(model.apply(p, with_positions(graphs, pos)) ** 2)
    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(params, graphs.nodes[POSITIONS])


_RESULTS = {}


def _cached_results(execution: dict, params, graphs, gradients: bool = True):
    """The small model's outputs under ``execution`` -- with ``gradients``, ``(value, grads)``
    of ``_value_and_grad`` -- computed once per module (several cases compare against the same
    reference): always the ``model_and_params`` parameters on ``small_batch``, both seeded."""
    key = (tuple(sorted(execution.items())), gradients)
    if key not in _RESULTS:
        model = small_model(**execution)
        _RESULTS[key] = _value_and_grad(model, params, graphs) if gradients else jax.jit(model.apply)(params, graphs)
    return _RESULTS[key]


# Each execution choice against an explicit, different path (on a CPU ``auto`` resolves to
# ``none``, so ``none`` is compared with ``full``); tf32 against fp32 on the same path. Gradients
# where the choice changes the backward pass (chunks, rematerialisation, low memory, paired
# radial weights) and for one fused path; the other fusion levels' gradients are compared layer
# by layer (tests/test_layers.py), so here their values suffice.
EXECUTION_CASES = [
    (dict(fuse_level="none"), dict(fuse_level="full"), True),
    (dict(fuse_level="partial_in"), dict(fuse_level="none"), False),
    (dict(fuse_level="full", low_memory=True), dict(fuse_level="none"), True),
    (dict(fuse_level="none", remat="off", edge_chunk=64), dict(fuse_level="full"), True),
    (dict(fuse_level="partial_out", remat="on", edge_chunk=32), dict(fuse_level="none"), True),
    (dict(fuse_level="none", paired_edges=False), dict(fuse_level="none"), True),
    (dict(fuse_level="none", precision="tf32", mode="infer"), dict(fuse_level="none", mode="infer"), False),
]


@pytest.mark.parametrize(
    "execution,reference,gradients",
    EXECUTION_CASES,
    ids=lambda e: "-".join(f"{k}={v}" for k, v in e.items()) if isinstance(e, dict) else ("grads" if e else "values"),
)
def test_execution_choices_give_the_same_values_and_gradients(
    execution, reference, gradients, small_batch, model_and_params, precision_rtol
):
    """Execution choices share parameters and give the same values (and gradients): float32
    rounding apart, and tf32 within its tolerance on this backend (float32 on a CPU)."""
    _, params = model_and_params
    expected = _cached_results(reference, params, small_batch, gradients)
    got = _cached_results(execution, params, small_batch, gradients)
    rtol = precision_rtol(execution.get("precision", "fp32"))
    if not gradients:
        assert relative_error(got, expected) < rtol
        return
    (value, grads), (ref_value, ref_grads) = got, expected
    assert relative_error(value, ref_value) < rtol
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert relative_error(g, g_ref) < 10 * rtol


def test_pallas_kernel_gives_the_xla_values_and_gradients(small_batch):
    """The fused Pallas kernel (interpreted on a CPU) inside the whole model: the same values and
    gradients as XLA's einsums at the same level. A one-layer model of degrees 0 and 1: the
    interpreter runs every grid step as a loop, and tests/test_fused_kernel.py covers the
    kernel itself at every degree and precision."""
    models = [
        SE3TransformerPooled(
            num_layers=1,
            num_degrees=2,
            num_channels=8,
            num_heads=2,
            execution=Execution(kernel=k, fuse_level="partial_out"),
        )
        for k in ("pallas", "xla")
    ]
    params = init_params(models[1], jax.random.PRNGKey(0), small_batch)
    (value, grads), (ref_value, ref_grads) = (_value_and_grad(m, params, small_batch) for m in models)
    assert relative_error(value, ref_value) < 1e-5
    for g, g_ref in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
        assert relative_error(g, g_ref) < 1e-4


def test_unpaired_edges_are_refused_by_a_paired_model(small_batch, model_and_params):
    _, params = model_and_params
    model = small_model(paired_edges=True)
    swapped = small_batch._replace(senders=small_batch.senders[::-1].copy())
    with pytest.raises(ValueError, match="expects paired edges"):
        model.apply(params, swapped)
    # under jit the check cannot raise: the outputs are NaN, never silently wrong numbers
    assert bool(jnp.all(jnp.isnan(jax.jit(model.apply)(params, swapped))))


@pytest.mark.parametrize("precision,rtol", [("bf16", 5e-2), ("fp16", 1e-2)])
def test_reduced_precision_close_to_fp32(precision, rtol, model_and_params, small_batch):
    """bf16 keeps 8 mantissa bits (~4e-3 per rounding), fp16 11 bits (~5e-4); errors compound
    over 2 layers, so predictions must agree within 5% / 1% of their scale."""
    model, params = model_and_params
    ref = jax.jit(model.apply)(params, small_batch)
    out = jax.jit(small_model(precision=precision).apply)(params, small_batch)
    assert out.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(out)))
    err = relative_error(out[:3], ref[:3])
    assert 0 < err < rtol, err  # > 0: the reduced precision path really ran


def test_gradients_finite_with_padding(model_and_params, small_batch):
    """Padding nodes all sit at the origin: padded edges have zero length. The reference loss
    sums every graph's output, the padding graph's too, so its gradients flow through them."""
    _, params = model_and_params
    value, grads = _cached_results(dict(fuse_level="none"), params, small_batch)
    for g in (value, *jax.tree.leaves(grads)):
        assert bool(jnp.all(jnp.isfinite(g)))
    assert float(jnp.abs(grads[1]).max()) > 0 and float(jnp.abs(grads[1][~padding_masks(small_batch).nodes]).max()) == 0


@pytest.mark.parametrize(
    "mutate,message",
    [
        (
            lambda g: g._replace(nodes={**g.nodes, POSITIONS: g.nodes[POSITIONS].at[2, 1].set(np.nan)}),
            "NaN or infinite",
        ),
        (
            lambda g: g._replace(nodes={**g.nodes, POSITIONS: g.nodes[POSITIONS].at[0, 0].set(np.inf)}),
            "NaN or infinite",
        ),
        (lambda g: g._replace(nodes={**g.nodes, FEATURES: g.nodes[FEATURES][:, :5]}), "node features must have shape"),
        (lambda g: g._replace(edges={FEATURES: g.edges[FEATURES][:, :3]}), "edge features must have shape"),
        (
            lambda g: g._replace(nodes={**g.nodes, POSITIONS: g.nodes[POSITIONS][:, :2]}),
            r"positions must have shape \[N, 3\]",
        ),
        (lambda g: g._replace(senders=g.senders.at[0].set(10_000)), "senders index out of range"),
        (
            lambda g: g._replace(nodes={**g.nodes, FEATURES: g.nodes[FEATURES].astype(jnp.int32)}),
            "must be floating point",
        ),
        (lambda g: g._replace(nodes={"positions": g.nodes[POSITIONS]}), "graphs.nodes must be a dict"),
        (lambda g: (g.nodes, g.edges), "expected a jraph.GraphsTuple"),
    ],
)
def test_bad_inputs_raise_clear_errors(mutate, message, model_and_params, small_batch):
    model, params = model_and_params
    graphs = jax.tree.map(jnp.asarray, small_batch)
    with pytest.raises(ValueError, match=message):
        model.apply(params, mutate(graphs))


def test_a_batch_closed_over_by_jit_is_still_checked(model_and_params, small_batch):
    """A batch held as a constant by a jitted function (numpy arrays) is concrete: its values are
    checked while tracing (clear error for NaN), and a valid one gives the usual outputs (no
    tracer meets a numpy array on the way)."""
    model, params = model_and_params
    closed_over = jax.jit(lambda p: model.apply(p, small_batch))(params)
    np.testing.assert_allclose(closed_over, jax.jit(model.apply)(params, small_batch), rtol=1e-6, atol=1e-7)
    broken = small_batch._replace(nodes={**small_batch.nodes, POSITIONS: small_batch.nodes[POSITIONS].copy()})
    broken.nodes[POSITIONS][1, 2] = np.nan
    with pytest.raises(ValueError, match="NaN or infinite"):
        jax.jit(lambda p: model.apply(p, broken))(params)


def test_oversize_and_empty_batches_raise():
    mols = _molecules()
    with pytest.raises(ValueError, match="does not fit the padding budget"):
        pad_to_budget(mols, PaddingBudget(16, 80, 4))
    with pytest.raises(ValueError, match="empty list"):
        pad_to_budget([], PaddingBudget(16, 80, 4))


def test_precomputed_harmonics_give_the_same_outputs(model_and_params, small_batch):
    from se3jax.graphs import HARMONICS

    model, params = model_and_params
    harmonics, _ = edge_geometry(
        small_batch.nodes[POSITIONS], small_batch.senders, small_batch.receivers, 2 * (SMALL["num_degrees"] - 1)
    )
    with_harmonics = small_batch._replace(edges={**small_batch.edges, HARMONICS: np.asarray(harmonics)})
    np.testing.assert_allclose(
        jax.jit(model.apply)(params, with_harmonics), jax.jit(model.apply)(params, small_batch), rtol=1e-6, atol=1e-7
    )
    wrong = small_batch._replace(edges={**small_batch.edges, HARMONICS: np.asarray(harmonics)[:, :16]})
    with pytest.raises(ValueError, match="precomputed edge harmonics have shape"):
        model.apply(params, wrong)
