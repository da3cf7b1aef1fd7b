"""se3jax: a fast, lean SE(3)-Transformer in JAX/Flax.

The names below load their modules (and JAX) on first use, so that light modules such as
``se3jax.host_memory`` can be imported before JAX: the training entry point restarts itself
with host allocator settings before paying for JAX's import.
"""

import importlib

_EXPORTS = {
    "EdgeInputs": "se3jax.edges",
    "edge_inputs": "se3jax.edges",
    "Execution": "se3jax.execution",
    "FuseLevel": "se3jax.execution",
    "Features": "se3jax.fiber",
    "Fiber": "se3jax.fiber",
    "init_params": "se3jax.initialisation",
    "AttentionBlockSE3": "se3jax.layers",
    "ConvSE3": "se3jax.layers",
    "LinearSE3": "se3jax.layers",
    "NormSE3": "se3jax.layers",
    "SE3Transformer": "se3jax.model",
    "SE3TransformerPooled": "se3jax.model",
    "PointCloudTrunk": "se3jax.point_cloud_trunk",
    "get_policy": "se3jax.precision",
}
__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'se3jax' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + __all__)
