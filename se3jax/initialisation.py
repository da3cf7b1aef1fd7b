"""How parameters start: every se3jax parameter's distribution, and :func:`init_params`, which
draws them on the host.

Flax's ``jax.jit(model.init)`` compiles one random draw per parameter array, and XLA takes
~0.1 s for each on a CPU whatever its size: for the QM9 model's 213 arrays 19-22 s of compiling
(2-core Xeon), the longest part of a training run's start after the step's own compile.
:func:`init_params` instead traces the model once for its parameters' shapes, as
``jax.eval_shape`` does (nothing is compiled), then draws each array from the same
distribution with NumPy, seeded by the key: 3.4 s for the QM9 model. The values differ from
``model.init``'s (another generator), the distributions and the tree do not, and ``model.init``
still works as Flax's (under ``jit`` too).

>>> import jax, numpy as np
>>> from se3jax.model import SE3TransformerPooled
>>> from se3jax.testing import synthetic_batch
>>> model = SE3TransformerPooled(num_layers=1, num_channels=8, num_heads=2)
>>> batch, key = synthetic_batch(np.random.default_rng(0), 2), jax.random.PRNGKey(0)
>>> params = init_params(model, key, batch)
>>> jax.tree.map(np.shape, params) == jax.tree.map(np.shape, jax.eval_shape(model.init, key, batch))
True
"""

from __future__ import annotations

import contextvars
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

# While init_params traces a model, the initialisers record their distribution here
# (parameter path -> Initialiser) instead of drawing.
_RECORDING: contextvars.ContextVar[dict | None] = contextvars.ContextVar("se3jax_init_recording", default=None)


@dataclasses.dataclass(frozen=True)
class Initialiser:
    """A Flax initialiser ``(key, shape, dtype) -> array`` for the parameter at ``path`` (its
    module's path and its name): ``uniform`` in ``+-scale``, ``normal`` with standard deviation
    ``scale``, or ``constant`` equal to ``scale``."""

    path: tuple[str, ...]
    kind: str
    scale: float

    def __post_init__(self):
        if self.kind not in ("uniform", "normal", "constant"):
            raise ValueError(f"unknown initial distribution {self.kind!r}")

    def __call__(self, key, shape, dtype=jnp.float32):
        recording = _RECORDING.get()
        if recording is not None:
            recording[self.path] = self
            return jnp.zeros(shape, dtype)
        if self.kind == "uniform":
            return jax.random.uniform(key, shape, dtype, -1.0, 1.0) * jnp.asarray(self.scale, dtype)
        if self.kind == "normal":
            return jax.random.normal(key, shape, dtype) * jnp.asarray(self.scale, dtype)
        return jnp.full(shape, self.scale, dtype)

    def draw(self, generator: np.random.Generator, shape, dtype) -> np.ndarray:
        if self.kind == "uniform":
            values = generator.uniform(-1.0, 1.0, shape) * self.scale
        elif self.kind == "normal":
            values = generator.standard_normal(shape) * self.scale
        else:
            values = np.full(shape, self.scale)
        return values.astype(dtype)


def param(module, name: str, kind: str, scale: float, shape) -> jax.Array:
    """``module``'s float32 parameter ``name``, made with the :class:`Initialiser` at its path."""
    return module.param(name, Initialiser((*module.path, name), kind, scale), shape, jnp.float32)


def initialisers_of(module, rng: jax.Array, *args, **kwargs) -> tuple[dict, dict]:
    """One trace of ``module.init(rng, *args, **kwargs)``: its variables' shapes and dtypes
    (``jax.ShapeDtypeStruct`` leaves) and the :class:`Initialiser` of each parameter, by its path
    in ``["params"]``. Nothing is compiled or drawn."""
    recording: dict = {}
    token = _RECORDING.set(recording)
    try:
        shapes = jax.eval_shape(lambda key, *a: module.init(key, *a, **kwargs), rng, *args)
    finally:
        _RECORDING.reset(token)
    return shapes, recording


def init_params(module, rng: jax.Array, *args, **kwargs) -> dict:
    """``module.init(rng, *args, **kwargs)``'s variables -- the same tree, shapes, dtypes and
    distributions -- drawn on the host with NumPy, seeded by ``rng``; only the model's shapes
    are traced, nothing is compiled. ``rng`` must be concrete (call it outside ``jit``; inside,
    use ``module.init``). Every parameter must be made with an :class:`Initialiser`."""
    if isinstance(rng, jax.core.Tracer):
        raise TypeError("init_params draws on the host: call it outside jit (or use module.init inside)")
    shapes, initialisers = initialisers_of(module, rng, *args, **kwargs)
    key_words = jax.random.key_data(rng) if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key) else rng
    generator = np.random.default_rng(np.asarray(key_words, np.uint32).ravel())
    leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
    values = []
    for path, leaf in leaves:  # in the tree's (sorted) order: the draws are reproducible
        names = tuple(str(getattr(k, "key", k)) for k in path)
        initialiser = initialisers.get(names[1:]) if names[0] == "params" else None
        if initialiser is None:
            raise ValueError(
                f"init_params: {'/'.join(names)} was not made with an se3jax Initialiser "
                "(se3jax.initialisation): use module.init for this model"
            )
        values.append(jnp.asarray(initialiser.draw(generator, leaf.shape, leaf.dtype)))
    return jax.tree_util.tree_unflatten(treedef, values)
