"""The radial weights fused into the TFN contraction: a Pallas kernel.

For a fusion group, every row ``r`` (a bond, or an edge) contracts its own weight matrix with
its basis-projected source features::

    msg[r, s, o, k] = sum_j R[r, o, j] * t[r, s, j, k],    R[r] = h[r] @ W   ([M] x [M, O*J])

The XLA path writes ``R`` (~45,000 numbers per bond and layer) to device memory, reads it back,
and recomputes it in the backward pass. This kernel takes a tile of rows, forms their ``R`` on
chip from the radial MLP's last hidden layer, contracts it at once and writes only the messages;
its backward pass (a custom VJP) recomputes ``R`` per tile as well, and never materialises it
either: the kernel-weight gradient is reduced per tile (``[tiles, M, O*J]``, summed after).

The kernel runs through Pallas: the Triton lowering on GPUs, interpret mode on CPUs (how the
tests check it against the einsum path in every precision). It is an execution choice
(``Execution(kernel="pallas")``), never a different function or different parameters, and off
unless asked for: no GPU measurement has yet shown it faster than XLA (``scripts/gpu_check.py
--only pallas`` measures it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from se3jax.precision import Policy

TILE_ROWS = 64


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _wide(dtype):
    """Accumulation dtype: float32, or float64 for float64 operands."""
    return jnp.promote_types(dtype, jnp.float32)


def _forward_kernel(precision, h_ref, w_ref, t_ref, out_ref):
    h, w, t = h_ref[...], w_ref[...], t_ref[...]  # [T, M], [M, O*J], [T, S, J, K]
    rows, _, j, _ = t.shape
    radial = jnp.dot(h, w, precision=precision, preferred_element_type=_wide(h.dtype))
    radial = radial.reshape(rows, -1, j).astype(t.dtype)  # [T, O, J], on chip only
    out_ref[...] = jnp.einsum(
        "roj,rsjk->rsok", radial, t, precision=precision, preferred_element_type=_wide(h.dtype)
    ).astype(out_ref.dtype)


def _backward_kernel(precision, h_ref, w_ref, t_ref, g_ref, dh_ref, dw_ref, dt_ref):
    h, w, t, g = h_ref[...], w_ref[...], t_ref[...], g_ref[...]  # g: [T, S, O, K]
    rows, _, j, _ = t.shape
    radial = jnp.dot(h, w, precision=precision, preferred_element_type=_wide(h.dtype))
    radial = radial.reshape(rows, -1, j).astype(t.dtype)  # recomputed, never stored
    g = g.astype(t.dtype)
    dt_ref[...] = jnp.einsum(
        "roj,rsok->rsjk", radial, g, precision=precision, preferred_element_type=_wide(h.dtype)
    ).astype(dt_ref.dtype)
    d_radial = jnp.einsum("rsok,rsjk->roj", g, t, precision=precision, preferred_element_type=_wide(h.dtype))
    d_radial = d_radial.reshape(rows, -1).astype(h.dtype)  # [T, O*J]
    dh = jnp.dot(d_radial, w.T, precision=precision, preferred_element_type=_wide(h.dtype))
    dh_ref[...] = dh.astype(dh_ref.dtype)
    dw_ref[...] = jnp.dot(h.T, d_radial, precision=precision, preferred_element_type=_wide(h.dtype))[None]


def _pad_to(x: jax.Array, shape) -> jax.Array:
    return jnp.pad(x, [(0, s - d) for s, d in zip(shape, x.shape)])


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _fused(h, w, t, precision, interpret, tile):
    return _call_forward(h, w, t, precision, interpret, tile)


def _call_forward(h, w, t, precision, interpret, tile):
    rows, m = h.shape
    _, s, j, k = t.shape
    o = w.shape[1] // j
    return pl.pallas_call(
        functools.partial(_forward_kernel, precision),
        out_shape=jax.ShapeDtypeStruct((rows, s, o, k), _wide(h.dtype)),
        grid=(rows // tile,),
        in_specs=[
            pl.BlockSpec((tile, m), lambda i: (i, 0)),
            pl.BlockSpec((m, o * j), lambda i: (0, 0)),
            pl.BlockSpec((tile, s, j, k), lambda i: (i, 0, 0, 0)),
        ],
        out_specs=pl.BlockSpec((tile, s, o, k), lambda i: (i, 0, 0, 0)),
        interpret=interpret,
    )(h, w, t)


def _fused_fwd(h, w, t, precision, interpret, tile):
    return _call_forward(h, w, t, precision, interpret, tile), (h, w, t)


def _fused_bwd(precision, interpret, tile, residuals, g):
    h, w, t = residuals
    rows, m = h.shape
    _, s, j, k = t.shape
    o = w.shape[1] // j
    tiles = rows // tile
    dh, dw_tiles, dt = pl.pallas_call(
        functools.partial(_backward_kernel, precision),
        out_shape=(
            jax.ShapeDtypeStruct(h.shape, h.dtype),
            jax.ShapeDtypeStruct((tiles, m, o * j), _wide(h.dtype)),
            jax.ShapeDtypeStruct(t.shape, t.dtype),
        ),
        grid=(tiles,),
        in_specs=[
            pl.BlockSpec((tile, m), lambda i: (i, 0)),
            pl.BlockSpec((m, o * j), lambda i: (0, 0)),
            pl.BlockSpec((tile, s, j, k), lambda i: (i, 0, 0, 0)),
            pl.BlockSpec((tile, s, o, k), lambda i: (i, 0, 0, 0)),
        ],
        out_specs=(
            pl.BlockSpec((tile, m), lambda i: (i, 0)),
            pl.BlockSpec((1, m, o * j), lambda i: (i, 0, 0)),
            pl.BlockSpec((tile, s, j, k), lambda i: (i, 0, 0, 0)),
        ),
        interpret=interpret,
    )(h, w, t, g.astype(_wide(h.dtype)))
    return dh, jnp.sum(dw_tiles, axis=0).astype(w.dtype), dt


_fused.defvjp(_fused_fwd, _fused_bwd)


def fused_messages(
    h: jax.Array, w: jax.Array, t: jax.Array, policy: Policy, tile_rows: int = TILE_ROWS, interpret: bool | None = None
) -> jax.Array:
    """``msg[r, s, o, k] = sum_j (h[r] @ w)[o, j] t[r, s, j, k]`` without materialising
    ``h @ w``. ``h`` [R, M], ``w`` [M, O*J] (laid out ``[o, j]``), ``t`` [R, S, J, K]; returns
    ``[R, S, O, K]`` in the policy's accumulation dtype, differentiable in all three.

    Rows are padded to a multiple of the tile; on GPUs the other axes are padded to powers of
    two (what the Triton lowering needs). ``interpret``: default on CPUs.
    """
    if interpret is None:
        interpret = jax.default_backend() == "cpu"
    rows, m = h.shape
    _, s, j, k = t.shape
    o = w.shape[1] // j
    dtype = policy.compute_dtype
    tile = min(tile_rows, _next_power_of_two(rows))
    padded_rows = -(-rows // tile) * tile
    if interpret:
        shape = dict(m=m, o=o, j=j, k=k)
    else:
        shape = {name: _next_power_of_two(n) for name, n in dict(m=m, o=o, j=j, k=k).items()}
    hp = _pad_to(h.astype(dtype), (padded_rows, shape["m"]))
    wp = _pad_to(w.astype(dtype).reshape(m, o, j), (shape["m"], shape["o"], shape["j"]))
    wp = wp.reshape(shape["m"], shape["o"] * shape["j"])
    tp = _pad_to(t.astype(dtype), (padded_rows, s, shape["j"], shape["k"]))
    out = _fused(hp, wp, tp, policy.dot_precision, interpret, tile)
    return out[:rows, :, :o, :k].astype(policy.accumulation_dtype)


def reference_messages(h, w, t, policy: Policy) -> jax.Array:
    """The XLA path's computation of the same messages: ``h @ w`` materialised, then one
    batched contraction."""
    rows, _ = h.shape
    _, _, j, _ = t.shape
    with jax.named_scope("radial_weights"):  # named scopes label the ops for profiles
        radial = policy.einsum("rm,mw->rw", h, w, wide_result=False).reshape(rows, -1, j)  # [R, O, J]
    with jax.named_scope("tfn_contraction"):
        return policy.einsum("roj,rsjk->rsok", radial, t)  # [R, S, O, K]
