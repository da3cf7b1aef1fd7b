"""init_params: the tree and the distributions of Flax's ``model.init``, drawn on the host
(se3jax/initialisation.py)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.execution import Execution
from se3jax.initialisation import init_params, initialisers_of
from se3jax.model import SE3TransformerPooled

KEY = jax.random.PRNGKey(0)


def tiny_model(**execution):
    execution = Execution(**execution)
    return SE3TransformerPooled(num_layers=1, num_degrees=2, num_channels=8, num_heads=2, execution=execution)


def flat(tree) -> dict:
    return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


@pytest.mark.parametrize("low_memory", [False, True])  # low memory: the blocks under nn.remat
def test_the_tree_is_model_inits(small_batch, low_memory):
    model = tiny_model(low_memory=low_memory)
    params = init_params(model, KEY, small_batch)
    expected = jax.eval_shape(model.init, KEY, small_batch)
    assert jax.tree.structure(params) == jax.tree.structure(expected)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(expected)):
        assert got.shape == want.shape and got.dtype == want.dtype


def test_every_parameter_has_its_initialisers_distribution_as_in_model_init(small_batch):
    """Each parameter, standardised by its initialiser's scale, pooled by kind: uniform in
    [-1, 1] (variance 1/3), standard normal, or the constant itself -- for init_params' NumPy
    draws and for Flax's own init alike. Tolerances: ~4 standard errors of the pooled moments
    (16,545 uniform values: mean 0.0045, variance 0.0023; 264 normal: 0.062, 0.087)."""
    model = tiny_model()
    shapes, initialisers = initialisers_of(model, KEY, small_batch)
    assert len(initialisers) == len(jax.tree.leaves(shapes))
    for params in (init_params(model, KEY, small_batch), jax.jit(model.init)(KEY, small_batch)):
        pooled = {"uniform": [], "normal": []}
        for path, value in jax.tree_util.tree_flatten_with_path(params["params"])[0]:
            init = initialisers[tuple(k.key for k in path)]
            if init.kind == "constant":
                assert np.all(np.asarray(value) == init.scale), path
            else:
                pooled[init.kind].append(np.ravel(value) / init.scale)
        uniform, normal = np.concatenate(pooled["uniform"]), np.concatenate(pooled["normal"])
        assert len(uniform) > 15_000 and len(normal) > 250
        assert np.abs(uniform).max() <= 1.0 and np.abs(uniform).max() > 0.999
        assert abs(uniform.mean()) < 0.02 and abs(uniform.var() - 1 / 3) < 0.01
        assert abs(normal.mean()) < 0.25 and abs(normal.var() - 1) < 0.35


def test_draws_are_reproducible_from_the_key_and_differ_between_parameters(small_batch):
    model = tiny_model()
    first, again, other = (flat(init_params(model, k, small_batch)) for k in (KEY, KEY, jax.random.PRNGKey(1)))
    typed = flat(init_params(model, jax.random.key(0), small_batch))  # a typed key: the same words
    for name, value in first.items():
        np.testing.assert_array_equal(value, again[name])
        np.testing.assert_array_equal(value, typed[name])
        if np.ptp(value) > 0:  # not a constant
            assert not np.array_equal(value, other[name]), name
    random = [v for v in first.values() if np.ptp(v) > 0]
    same_shape = [(a, b) for i, a in enumerate(random) for b in random[i + 1 :] if a.shape == b.shape]
    assert same_shape and not any(np.array_equal(a, b) for a, b in same_shape)


def test_a_traced_key_and_foreign_initialisers_are_refused():
    x = jnp.ones((2, 4))
    with pytest.raises(TypeError, match="outside jit"):
        jax.jit(lambda key: init_params(nn.Dense(3), key, x))(KEY)
    with pytest.raises(ValueError, match=r"params/(bias|kernel) was not made with an se3jax Initialiser"):
        init_params(nn.Dense(3), KEY, x)  # Flax's default initialisers
