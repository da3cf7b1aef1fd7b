"""e3nn-jax in and out: se3jax features (``{degree: [..., C, 2d+1]}``) <-> ``e3nn.IrrepsArray``.

Conventions (tested in tests/test_e3nn_interop.py):

- **Basis and ordering.** se3jax's harmonics, Clebsch–Gordan numbers and Wigner-D matrices are
  e3nn-jax's own (real basis, e3nn's ``m`` order; degree 1 is ``(x, y, z)``), so a degree-d
  feature is an e3nn irrep of ``l = d`` component for component: rotating the IrrepsArray with
  e3nn's D matrices (``transform_by_matrix``) is rotating the features with
  :func:`se3jax.testing.rotate_features`. Normalisation is irrelevant to features (it only
  scales the trunk's internal kernels), so no rescaling happens in either direction.
- **Layout.** The ``C`` channels of degree ``d`` are the multiplicity: ``[..., C, 2d+1]``
  flattens, channel-major, to e3nn's ``Cx{d}`` block; degrees come out in increasing order.
- **Parity.** The SE(3)-Transformer is equivariant under rotations and translations, not under
  inversion (its kernels of odd order ``J - |d_in - d_out|`` mix parities), so parity is no
  property of its features. Going out, degrees are labelled with the natural parity of
  spherical harmonics, ``0e + 1o + 2e + 3o`` (what position-derived vectors have); coming
  in, any parity is accepted and dropped (a ``1e`` pseudovector enters as a degree-1 feature:
  under rotations it is one), and irreps of the same ``l`` are concatenated along channels in
  the order they appear. Only rotation equivariance is claimed for compositions.

>>> import jax.numpy as jnp
>>> x = features_to_irreps_array({0: jnp.ones((5, 2, 1)), 1: jnp.zeros((5, 1, 3))})
>>> x.irreps, x.shape
(2x0e+1x1o, (5, 5))
>>> {d: v.shape for d, v in irreps_array_to_features(x).items()}
{0: (5, 2, 1), 1: (5, 1, 3)}
"""

from __future__ import annotations

import e3nn_jax as e3nn
import jax.numpy as jnp

from se3jax.fiber import Features, Fiber, degree_dim


def natural_parity(degree: int) -> int:
    """The parity e3nn gives spherical harmonics of ``degree``: ``(-1)^degree``."""
    return (-1) ** degree


def fiber_to_irreps(fiber: Fiber) -> e3nn.Irreps:
    """``Fiber({0: 8, 1: 2})`` -> ``8x0e+2x1o``."""
    return e3nn.Irreps([(c, (d, natural_parity(d))) for d, c in fiber])


def irreps_to_fiber(irreps) -> Fiber:
    """The fiber that holds ``irreps`` (parity dropped, same ``l`` merged): ``1x0e+2x1o+1x1e``
    -> ``Fiber({0: 1, 1: 3})``."""
    channels: dict[int, int] = {}
    for mul, ir in e3nn.Irreps(irreps):
        if mul:
            channels[ir.l] = channels.get(ir.l, 0) + mul
    return Fiber(channels)


def features_to_irreps_array(features: Features) -> e3nn.IrrepsArray:
    """se3jax features ``{d: [..., C_d, 2d+1]}`` -> an IrrepsArray ``[..., sum_d C_d (2d+1)]``
    with irreps ``C_0x0e + C_1x1o + ...`` (degrees in increasing order)."""
    if not features:
        raise ValueError("no features to convert")
    degrees = sorted(features)
    lead = jnp.shape(features[degrees[0]])[:-2]
    blocks = []
    for d in degrees:
        x = jnp.asarray(features[d])
        if x.ndim < 2 or x.shape[-1] != degree_dim(d) or x.shape[:-2] != lead:
            raise ValueError(
                f"degree-{d} features must be [..., C, {degree_dim(d)}] with leading shape {lead}, got {x.shape}"
            )
        blocks.append(x.reshape(*lead, x.shape[-2] * x.shape[-1]))
    irreps = fiber_to_irreps(Fiber({d: features[d].shape[-2] for d in degrees}))
    return e3nn.IrrepsArray(irreps, jnp.concatenate(blocks, axis=-1))


def irreps_array_to_features(x: e3nn.IrrepsArray) -> Features:
    """An IrrepsArray ``[..., dim]`` -> se3jax features ``{l: [..., C_l, 2l+1]}`` (parity
    dropped; irreps of the same ``l`` concatenated along channels in order of appearance;
    e3nn's zero chunks become zeros)."""
    if not isinstance(x, e3nn.IrrepsArray):
        raise TypeError(f"expected an e3nn.IrrepsArray, got {type(x).__name__}")
    per_degree: dict[int, list] = {}
    for (mul, ir), chunk in zip(x.irreps, x.chunks):
        if mul == 0:
            continue
        if chunk is None:
            chunk = jnp.zeros(x.shape[:-1] + (mul, ir.dim), x.dtype)
        per_degree.setdefault(ir.l, []).append(chunk)
    if not per_degree:
        raise ValueError(f"the IrrepsArray {x.irreps} holds no features")
    return {d: jnp.concatenate(per_degree[d], axis=-2) for d in sorted(per_degree)}
