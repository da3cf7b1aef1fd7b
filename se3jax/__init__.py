"""se3jax: a fast, lean SE(3)-Transformer in JAX/Flax."""

from se3jax.edges import EdgeInputs, edge_inputs
from se3jax.execution import Execution, FuseLevel
from se3jax.fiber import Features, Fiber
from se3jax.layers import AttentionBlockSE3, ConvSE3, LinearSE3, NormSE3
from se3jax.model import SE3Transformer, SE3TransformerPooled
from se3jax.point_cloud_trunk import PointCloudTrunk
from se3jax.precision import get_policy

__version__ = "0.1.0"
