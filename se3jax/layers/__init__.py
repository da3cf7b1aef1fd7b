"""Equivariant layers: each a thin Flax module over small pure functions."""

from se3jax.layers.attention import AttentionBlockSE3, segment_softmax, split_heads
from se3jax.layers.convolution import ConvSE3, conv_plan, path_bases
from se3jax.layers.linear import LinearSE3
from se3jax.layers.norm import NormSE3
from se3jax.layers.pooling import pool_nodes
from se3jax.layers.radial import RadialProfile
