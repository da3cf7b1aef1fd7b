"""se3jax trains the function NVIDIA's reference trains: its parameter count, its initial scales
(PyTorch's nn.Linear initialisation, integral-normalised harmonics, LinearSE3 weights stored as
randn / sqrt(c_in)), its radial MLP trunks, its self-interaction per incoming edge, its
LayerNorm, and its Kekule bond types (tests/test_molecules.py, tests/test_qm9.py)."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.basis import stacked_harmonics
from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.layers import ConvSE3, LinearSE3
from se3jax.layers.radial import LAYER_NORM_EPSILON, RadialProfile, layer_norm
from se3jax.model import SE3TransformerPooled

REFERENCE_PARAMETERS = 9_279_553  # NVIDIA's SE3TransformerPooled for QM9 (7 layers, 4 x 32, 8 heads)


def test_qm9_model_has_exactly_the_reference_parameter_count(small_batch):
    shapes = jax.eval_shape(SE3TransformerPooled().init, jax.random.PRNGKey(0), small_batch)
    assert sum(x.size for x in jax.tree.leaves(shapes)) == REFERENCE_PARAMETERS


def test_radial_trunks_follow_the_reference(small_batch):
    """First layer (scalars in, keys+values of uneven channels out): one trunk per path; hidden
    layers and the output convolution: one trunk."""
    shapes = jax.eval_shape(SE3TransformerPooled().init, jax.random.PRNGKey(0), small_batch)["params"]["trunk"]
    first = shapes["attention_0"]["key_value_conv"]
    assert sorted(k for k in first if k.startswith("radial")) == ["radial_0", "radial_1", "radial_2", "radial_3"]
    assert [k for k in shapes["attention_3"]["key_value_conv"] if k.startswith("radial")] == ["radial"]
    assert [k for k in shapes["output_conv"] if k.startswith("radial")] == ["radial"]
    # each first-layer trunk ends in its own path's weights: c_out x 6 x 1 frequency (d_in = 0),
    # c_out = 16 values + 16 keys for degree 0, 16 values for degrees 1..3
    assert [first[f"radial_{t}"]["kernel_out"].shape for t in range(4)] == [(32, 192)] + [(32, 96)] * 3


def test_dense_layers_start_as_pytorch_linear():
    params = RadialProfile(n_weights=500).init(jax.random.PRNGKey(0), jnp.ones((64, 5)))["params"]
    for name, fan_in in (("dense_0", 5), ("dense_1", 32)):
        for leaf in ("kernel", "bias"):
            w = np.asarray(params[name][leaf])
            bound = 1 / np.sqrt(fan_in)
            assert np.abs(w).max() <= bound and np.abs(w).max() > 0.8 * bound  # uniform +-1/sqrt(fan_in)
    out = np.asarray(params["kernel_out"])
    assert out.shape == (32, 500) and np.abs(out).max() <= 1 / np.sqrt(32)
    assert np.std(out) == pytest.approx(1 / np.sqrt(3 * 32), rel=0.05)


def test_harmonics_are_integral_normalised():
    unit = jnp.asarray(np.random.default_rng(0).normal(size=(2000, 3)))
    unit = unit / jnp.linalg.norm(unit, axis=1, keepdims=True)
    y = np.asarray(stacked_harmonics(unit, 2))
    np.testing.assert_allclose(y[:, 0], 1 / np.sqrt(4 * np.pi), rtol=1e-6)
    # the mean of Y_J^2 over the sphere is (2J + 1) / (4 pi) per order J
    np.testing.assert_allclose(np.mean(np.sum(y[:, 1:4] ** 2, axis=1)), 3 / (4 * np.pi), rtol=1e-6)


def test_linear_weights_are_stored_as_the_reference_and_used_as_is():
    layer = LinearSE3(Fiber({1: 64}), Fiber({1: 32}))
    x = {1: jnp.asarray(np.random.default_rng(1).normal(size=(5, 64, 3)), jnp.float32)}
    params = layer.init(jax.random.PRNGKey(0), x)
    w = np.asarray(params["params"]["weight_1"])
    assert np.std(w) == pytest.approx(1 / np.sqrt(64), rel=0.05)  # randn / sqrt(c_in)
    np.testing.assert_allclose(layer.apply(params, x)[1], np.einsum("oi,nim->nom", w, x[1]), rtol=1e-6, atol=1e-6)


def test_layer_norms_are_the_references():
    ln = layer_norm(None, "n")
    assert ln.epsilon == LAYER_NORM_EPSILON == 1e-5 and ln.use_fast_variance is False
    # exact variance: a large mean does not swamp a small spread (the one-pass formula does)
    # (in float32, E[x^2] - E[x]^2 at a mean of 1e4 cancels to noise: 1e8 has a spacing of 8)
    x = jnp.asarray(1e4 + np.random.default_rng(0).normal(size=(4, 32)), jnp.float32)
    y = ln.apply(ln.init(jax.random.PRNGKey(0), x), x)
    np.testing.assert_allclose(np.std(np.asarray(y), axis=1), 1.0, rtol=2e-3)


def test_self_interaction_counts_once_per_incoming_edge(small_batch):
    """per_edge (the reference's) adds W x once per incoming real edge: the difference to
    per_node is (in-degree - 1) W x for every node."""
    fiber = Fiber.create(2, 4)
    positions = jnp.asarray(small_batch.nodes[POSITIONS])
    edges = edge_inputs(
        positions,
        small_batch.senders,
        small_batch.receivers,
        1,
        small_batch.edges[FEATURES],
        padding_masks(small_batch).edges,
    )
    x = {
        d: jnp.asarray(np.random.default_rng(d).normal(size=(positions.shape[0], 4, 2 * d + 1)), jnp.float32)
        for d in (0, 1)
    }
    per_edge = ConvSE3(fiber, fiber, self_interaction="per_edge")
    params = per_edge.init(jax.random.PRNGKey(0), x, edges)
    a = per_edge.apply(params, x, edges)
    b = ConvSE3(fiber, fiber, self_interaction="per_node").apply(params, x, edges)
    w = flax.core.unfreeze(params)["params"]["self_interaction"]
    in_degree = np.bincount(np.asarray(small_batch.receivers)[np.asarray(edges.mask)], minlength=positions.shape[0])
    assert in_degree.max() > 1
    for d in (0, 1):
        expected = (in_degree - 1)[:, None, None] * np.einsum("oi,nim->nom", w[f"weight_{d}"], x[d])
        np.testing.assert_allclose(np.asarray(a[d] - b[d]), expected, rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="self_interaction must be"):
        ConvSE3(fiber, fiber, self_interaction="sometimes").init(jax.random.PRNGKey(0), x, edges)


def test_execution_options_never_change_the_parameters(small_batch):
    """The reference's structure changes with its fuse level; ours never does."""

    def tree(execution):
        model = SE3TransformerPooled(num_layers=2, execution=execution)
        return jax.tree.map(lambda x: x.shape, jax.eval_shape(model.init, jax.random.PRNGKey(0), small_batch))

    reference = tree(Execution())
    for level in ("none", "partial_in", "full"):
        assert tree(Execution(fuse_level=level, low_memory=True)) == reference
