"""The radial weights fused into the TFN contraction: Pallas kernels for NVIDIA GPUs.

For a fusion group, every row ``r`` (a bond, or an edge) contracts its own weight matrix with
its basis-projected source features::

    msg[r, s, o, k] = sum_j R[r, o, j] * t[r, s, j, k],    R[r] = h[r] @ W   ([M] x [M, O*J])

The XLA path writes ``R`` (``O*J`` numbers per row, up to 16,384) to device memory, reads it
back, and recomputes it in the backward pass. These kernels never store ``R``: a program takes
a tile of rows and forms their ``R`` chunk by chunk of ``J`` on chip, contracting each chunk at
once.

How they are built (Pallas Triton; the backend is named through its compiler parameters, so
the ``jax_pallas_use_mosaic_gpu`` default cannot pick Mosaic GPU, which has no lowering for
these dots through ``pallas_call`` and whose whole-block copies need 16-byte strides the small
``K`` axes lack; JAX 0.11 deprecates the Triton backend, with a warning at each lowering, in
favour of Mosaic GPU's warpgroup kernels: the port to come before JAX removes it):

- Every dot is 2-D (Pallas Triton lowers no batched ``dot_general``): per row tile and output
  channel ``o``, ``h_tile [T, M] @ W[:, o, j-chunk] [M, 16]`` on the tensor cores. The per-row
  contraction with ``t`` is a broadcast multiply and a sum over the 16 ``j`` of the chunk, in
  registers.
- Ragged edges (rows past the last bond, ``j`` past ``J``, ``k`` past ``K``, channels past
  ``O``) are masked loads and stores: ``t``, ``h`` and the messages are never padded or copied.
  Only the kernel ``W`` (parameter-sized) is laid out once per call as zero-padded
  ``[J chunks, O, M, 16]`` blocks.
- Forward: one program per (tile of rows, block of output channels); backward: one program per
  tile of rows for ``dh`` and ``dt`` (looping over every chunk and channel), and a separate
  weight-gradient kernel, one program per (block of channels, chunk of ``J``, part of the rows),
  that loops over its rows accumulating ``dW`` on chip: a few partials of ``W``'s size
  (``[parts, M, O*J]``, parts ~ 264 programs / (blocks x chunks)) instead of one per tile.

``interpret`` follows the platform being lowered for (:func:`jax.lax.platform_dependent`): the
Triton kernels when lowering for ``cuda``, Pallas interpret mode elsewhere (how the tests check
them against the einsum path in every precision on CPUs). The kernel is an execution choice
(``Execution(kernel="pallas")``), never a different function or different parameters, and off
unless asked for: no GPU measurement has yet shown it faster than XLA (``scripts/gpu_check.py
--only "partial_out xla" "partial_out pallas"`` measures the two side by side;
``scripts/check_kernel.py`` compiles the kernels for sm_90 on a CPU host).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from se3jax.precision import Policy

# J per chunk: the N of the radial-weight dot and the K of the dh dot (tensor-core dots need 16)
J_CHUNK = 16
# programs the weight-gradient kernel aims for: two per SM of an H100/H200 (132 SMs)
TARGET_PROGRAMS = 264


@dataclasses.dataclass(frozen=True)
class Tiles:
    """Tile sizes (powers of two) and Triton launch parameters; the defaults are sized so
    every program's registers and shared memory fit an sm_90 SM (``scripts/check_kernel.py``
    checks them with ``ptxas``).

    ``rows``/``channels``: rows and output channels per forward program; ``backward_rows``:
    rows per ``dh``/``dt`` program; ``weight_rows``/``weight_channels``: rows per step and
    channels per program of the weight-gradient kernel.
    """

    rows: int = 16
    channels: int = 4
    backward_rows: int = 16
    weight_rows: int = 32
    weight_channels: int = 4
    num_warps: int = 8
    num_stages: int = 2

    def __post_init__(self):
        for name in ("rows", "channels", "backward_rows", "weight_rows", "weight_channels"):
            value = getattr(self, name)
            if value < 1 or value & (value - 1):
                raise ValueError(f"Tiles.{name} must be a power of two, got {value}")
        for name in ("rows", "backward_rows", "weight_rows"):
            if getattr(self, name) < 16:
                raise ValueError(f"Tiles.{name} must be at least 16 (a tensor-core dot's M or K)")


TILES = Tiles()


@dataclasses.dataclass(frozen=True)
class Dims:
    """Static sizes of one call: ``rows`` R, ``m`` (padded to a power of two >= 16), ``o``,
    ``j``, ``k``, ``s``; ``k_pad``: K rounded up to a power of two (on chip only)."""

    rows: int
    m: int
    o: int
    j: int
    k: int
    s: int

    @property
    def k_pad(self) -> int:
        return _next_power_of_two(self.k)

    @property
    def chunks(self) -> int:
        return -(-self.j // J_CHUNK)


def _next_power_of_two(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def _wide(dtype):
    """Accumulation dtype: float32, or float64 for float64 operands."""
    return jnp.promote_types(dtype, jnp.float32)


def _i32(x) -> jax.Array:
    """An int32 index: every index of a load or store must be int32, also under x64."""
    return jnp.asarray(x, jnp.int32)


def _row_mask(start, size: int, total: int) -> jax.Array:
    return start + jnp.arange(size, dtype=jnp.int32) < total


def _load_t(t_ref, d: Dims, r0, rows_ok, chunk, size: int):
    """``t[r0 : r0 + size, s, chunk, :]`` for every ``s``, as ``[size, J_CHUNK, k_pad]`` in the
    accumulation dtype; zero past the last row, ``J`` and ``K``."""
    j0 = chunk * J_CHUNK
    mask = (
        rows_ok[:, None, None] & _row_mask(j0, J_CHUNK, d.j)[None, :, None] & (jnp.arange(d.k_pad) < d.k)[None, None, :]
    )
    window = lambda s: t_ref.at[pl.ds(r0, size), _i32(s), pl.ds(j0, J_CHUNK), pl.ds(_i32(0), d.k_pad)]  # noqa: E731
    return [plgpu.load(window(s), mask=mask, other=0).astype(_wide(t_ref.dtype)) for s in range(d.s)]


def _load_g(g_ref, d: Dims, r0, rows_ok, channel, size: int):
    """The cotangent ``g[r0 : r0 + size, s, channel, :]`` per ``s``, ``[size, k_pad]``."""
    mask = rows_ok[:, None] & (jnp.arange(d.k_pad) < d.k)[None, :] & (channel < d.o)
    window = lambda s: g_ref.at[pl.ds(r0, size), _i32(s), channel, pl.ds(_i32(0), d.k_pad)]  # noqa: E731
    return [plgpu.load(window(s), mask=mask, other=0) for s in range(d.s)]


def _radial_chunk(h, w, precision, compute_dtype):
    """``h [T, M] @ w [M, J_CHUNK]``, rounded to the compute dtype like the XLA path's stored
    ``R``, returned in the accumulation dtype."""
    radial = jnp.dot(h, w, precision=precision, preferred_element_type=_wide(h.dtype))
    return radial.astype(compute_dtype).astype(_wide(h.dtype))


def _forward_kernel(d: Dims, tiles: Tiles, precision, h_ref, w_ref, t_ref, out_ref):
    size, channels = tiles.rows, tiles.channels
    # channel blocks vary fastest in launch order: the programs of one row tile run together
    # and share its ``t`` through L2 (read from device memory about once)
    o0, r0 = pl.program_id(0) * channels, pl.program_id(1) * size
    rows_ok = _row_mask(r0, size, d.rows)
    h = plgpu.load(h_ref.at[pl.ds(r0, size), :], mask=rows_ok[:, None], other=0)  # [T, M]
    acc_dtype = _wide(h_ref.dtype)

    def chunk(c, acc):
        t = _load_t(t_ref, d, r0, rows_ok, c, size)  # S x [T, Jc, Kp]
        new = []
        for o in range(channels):  # unrolled: one accumulator per channel and s
            radial = _radial_chunk(h, w_ref[c, o0 + o], precision, h_ref.dtype)  # [T, Jc]
            new.append(tuple(acc[o][s] + jnp.sum(radial[:, :, None] * t[s], axis=1) for s in range(d.s)))
        return tuple(new)

    zeros = jnp.zeros((size, d.k_pad), acc_dtype)
    acc = jax.lax.fori_loop(_i32(0), _i32(d.chunks), chunk, tuple((zeros,) * d.s for _ in range(channels)))
    k_ok = jnp.arange(d.k_pad) < d.k
    for o in range(channels):
        mask = rows_ok[:, None] & k_ok[None, :] & (o0 + o < d.o)
        for s in range(d.s):
            window = out_ref.at[pl.ds(r0, size), _i32(s), o0 + o, pl.ds(_i32(0), d.k_pad)]
            plgpu.store(window, acc[o][s].astype(out_ref.dtype), mask=mask)


def _input_grad_kernel(d: Dims, tiles: Tiles, precision, h_ref, w_ref, wt_ref, t_ref, g_ref, dh_ref, dt_ref):
    """``dt[r, s, j, k] = sum_o R[r, o, j] g[r, s, o, k]`` and ``dh = dR @ W^T`` with
    ``dR[r, o, j] = sum_{s, k} g[r, s, o, k] t[r, s, j, k]``, for one tile of rows."""
    size = tiles.backward_rows
    r0 = pl.program_id(0) * size
    rows_ok = _row_mask(r0, size, d.rows)
    h = plgpu.load(h_ref.at[pl.ds(r0, size), :], mask=rows_ok[:, None], other=0)  # [T, M]
    acc_dtype = _wide(h_ref.dtype)

    def chunk(c, dh):
        t = _load_t(t_ref, d, r0, rows_ok, c, size)

        def channel(o, carry):
            dh, dt = carry
            radial = _radial_chunk(h, w_ref[c, o], precision, h_ref.dtype)  # [T, Jc]
            g = _load_g(g_ref, d, r0, rows_ok, o, size)  # S x [T, Kp]
            dt = tuple(dt[s] + radial[:, :, None] * g[s][:, None, :] for s in range(d.s))
            d_radial = sum(jnp.sum(g[s][:, None, :] * t[s], axis=2) for s in range(d.s))  # [T, Jc]
            dh = dh + jnp.dot(
                d_radial.astype(h_ref.dtype), wt_ref[c, o], precision=precision, preferred_element_type=acc_dtype
            )
            return dh, dt

        zeros = jnp.zeros((size, J_CHUNK, d.k_pad), acc_dtype)
        dh, dt = jax.lax.fori_loop(_i32(0), _i32(d.o), channel, (dh, (zeros,) * d.s))
        j0 = c * J_CHUNK
        mask = (
            rows_ok[:, None, None]
            & _row_mask(j0, J_CHUNK, d.j)[None, :, None]
            & (jnp.arange(d.k_pad) < d.k)[None, None, :]
        )
        for s in range(d.s):
            plgpu.store(
                dt_ref.at[pl.ds(r0, size), _i32(s), pl.ds(j0, J_CHUNK), pl.ds(_i32(0), d.k_pad)],
                dt[s].astype(dt_ref.dtype),
                mask=mask,
            )
        return dh

    dh = jax.lax.fori_loop(_i32(0), _i32(d.chunks), chunk, jnp.zeros((size, d.m), acc_dtype))
    plgpu.store(dh_ref.at[pl.ds(r0, size), :], dh.astype(dh_ref.dtype), mask=rows_ok[:, None])


def _weight_grad_kernel(d: Dims, tiles: Tiles, precision, steps, h_ref, t_ref, g_ref, dw_ref):
    """``dW[m, o, j] = sum_r h[r, m] dR[r, o, j]`` for one block of channels and one chunk of
    ``J``, over one part of the rows (``steps`` tiles), accumulated on chip."""
    size, channels = tiles.weight_rows, tiles.weight_channels
    o0, c, part = pl.program_id(0) * channels, pl.program_id(1), pl.program_id(2)
    acc_dtype = _wide(h_ref.dtype)

    def tile(step, acc):
        r0 = (part * steps + step) * size
        rows_ok = _row_mask(r0, size, d.rows)
        h = plgpu.load(h_ref.at[pl.ds(r0, size), :], mask=rows_ok[:, None], other=0)  # [T, M]
        t = _load_t(t_ref, d, r0, rows_ok, c, size)
        new = []
        for o in range(channels):
            g = _load_g(g_ref, d, r0, rows_ok, o0 + o, size)
            d_radial = sum(jnp.sum(g[s][:, None, :] * t[s], axis=2) for s in range(d.s))  # [T, Jc]
            new.append(
                acc[o]
                + jax.lax.dot_general(  # h^T @ dR: contracts the rows
                    h,
                    d_radial.astype(h_ref.dtype),
                    (((0,), (0,)), ((), ())),
                    precision=precision,
                    preferred_element_type=acc_dtype,
                )
            )
        return tuple(new)

    zeros = jnp.zeros((d.m, J_CHUNK), acc_dtype)
    acc = jax.lax.fori_loop(_i32(0), _i32(steps), tile, (zeros,) * channels)
    for o in range(channels):
        dw_ref[part, c, o0 + o] = acc[o]


def _pallas(kernel, out_shape, grid, tiles: Tiles, interpret: bool | None, name: str, *args):
    """``pallas_call`` of ``kernel``; ``interpret=None``: Triton when lowering for ``cuda``,
    interpret mode for every other platform."""

    def build(interpret_mode: bool):
        return pl.pallas_call(
            kernel,
            out_shape=out_shape,
            grid=grid,
            interpret=interpret_mode,
            # naming Triton's parameters picks the Triton lowering whatever jax_pallas_use_mosaic_gpu says
            compiler_params=None
            if interpret_mode
            else plgpu.CompilerParams(num_warps=tiles.num_warps, num_stages=tiles.num_stages),
            name=name,
        )

    if interpret is not None:
        return build(interpret)(*args)
    return jax.lax.platform_dependent(*args, cuda=build(False), default=build(True))


def _forward(d: Dims, tiles: Tiles, precision, interpret, h, w_blocks, t):
    grid = (pl.cdiv(d.o, tiles.channels), pl.cdiv(d.rows, tiles.rows))
    out_shape = jax.ShapeDtypeStruct((d.rows, d.s, d.o, d.k), _wide(h.dtype))
    kernel = functools.partial(_forward_kernel, d, tiles, precision)
    return _pallas(kernel, out_shape, grid, tiles, interpret, "fused_messages", h, w_blocks, t)


def weight_grad_parts(d: Dims, tiles: Tiles) -> tuple[int, int]:
    """(parts, tiles per part) of the weight-gradient kernel's rows: enough parts to give the
    GPU ~TARGET_PROGRAMS programs, each looping over as many row tiles as it can."""
    n_tiles = pl.cdiv(d.rows, tiles.weight_rows)
    blocks = pl.cdiv(d.o, tiles.weight_channels) * d.chunks
    parts = max(1, min(n_tiles, -(-TARGET_PROGRAMS // blocks)))
    steps = -(-n_tiles // parts)
    return -(-n_tiles // steps), steps


def _backward(d: Dims, tiles: Tiles, precision, interpret, h, w_blocks, t, g):
    acc_dtype = _wide(h.dtype)
    wt_blocks = jnp.swapaxes(w_blocks, 2, 3)  # [chunks, O, Jc, M]: W^T blocks for dh
    dh, dt = _pallas(
        functools.partial(_input_grad_kernel, d, tiles, precision),
        (jax.ShapeDtypeStruct(h.shape, h.dtype), jax.ShapeDtypeStruct(t.shape, t.dtype)),
        (pl.cdiv(d.rows, tiles.backward_rows),),
        tiles,
        interpret,
        "fused_messages_input_grad",
        h,
        w_blocks,
        wt_blocks,
        t,
        g,
    )
    parts, steps = weight_grad_parts(d, tiles)
    dw_parts = _pallas(
        functools.partial(_weight_grad_kernel, d, tiles, precision, steps),
        jax.ShapeDtypeStruct((parts,) + w_blocks.shape, acc_dtype),
        (pl.cdiv(d.o, tiles.weight_channels), d.chunks, parts),
        tiles,
        interpret,
        "fused_messages_weight_grad",
        h,
        t,
        g,
    )
    return dh, jnp.sum(dw_parts, axis=0).astype(w_blocks.dtype), dt


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _fused(d, tiles, precision, interpret, h, w_blocks, t):
    return _forward(d, tiles, precision, interpret, h, w_blocks, t)


def _fused_fwd(d, tiles, precision, interpret, h, w_blocks, t):
    return _forward(d, tiles, precision, interpret, h, w_blocks, t), (h, w_blocks, t)


def _fused_bwd(d, tiles, precision, interpret, residuals, g):
    return _backward(d, tiles, precision, interpret, *residuals, g.astype(_wide(residuals[0].dtype)))


_fused.defvjp(_fused_fwd, _fused_bwd)


def weight_blocks(w: jax.Array, m_pad: int, o: int, j: int, channels: int) -> jax.Array:
    """``w`` [M, O*J] (laid out ``[o, j]``) as zero-padded ``[J chunks, O', M', J_CHUNK]``
    blocks (O' a multiple of ``channels``): each (chunk, channel) block one contiguous load."""
    m = w.shape[0]
    chunks = -(-j // J_CHUNK)
    o_pad = -(-o // channels) * channels
    blocks = jnp.pad(w.reshape(m, o, j), [(0, m_pad - m), (0, o_pad - o), (0, chunks * J_CHUNK - j)])
    return blocks.reshape(m_pad, o_pad, chunks, J_CHUNK).transpose(2, 1, 0, 3)


def fused_messages(
    h: jax.Array,
    w: jax.Array,
    t: jax.Array,
    policy: Policy,
    tiles: Tiles = TILES,
    interpret: bool | None = None,
) -> jax.Array:
    """``msg[r, s, o, k] = sum_j (h[r] @ w)[o, j] t[r, s, j, k]`` without materialising
    ``h @ w``. ``h`` [R, M], ``w`` [M, O*J] (laid out ``[o, j]``), ``t`` [R, S, J, K]; returns
    ``[R, S, O, K]`` in the policy's accumulation dtype, differentiable in all three.

    ``interpret``: ``None`` follows the platform being lowered for (Triton kernels for
    ``cuda``, interpret mode elsewhere); ``True``/``False`` force one.
    """
    if h.ndim != 2 or w.ndim != 2 or t.ndim != 4:
        raise ValueError(f"expected h [R, M], w [M, O*J], t [R, S, J, K]; got {h.shape}, {w.shape}, {t.shape}")
    rows, m = h.shape
    _, s, j, k = t.shape
    if t.shape[0] != rows or w.shape[0] != m or w.shape[1] % j:
        raise ValueError(f"mismatched shapes: h {h.shape}, w {w.shape}, t {t.shape} (w's columns must be O*J)")
    dtype = policy.compute_dtype
    m_pad = max(16, _next_power_of_two(m))  # the dot's K: a power of two, at least 16
    d = Dims(rows=rows, m=m_pad, o=w.shape[1] // j, j=j, k=k, s=s)
    channels = max(tiles.channels, tiles.weight_channels)  # both powers of two: a common multiple
    w_blocks = weight_blocks(w.astype(dtype), m_pad, d.o, j, channels)
    h = h.astype(dtype)
    if m_pad != m:  # the radial MLP's width (32 in every config): padded only when it is not a power of two
        h = jnp.pad(h, [(0, 0), (0, m_pad - m)])
    out = _fused(d, tiles, policy.dot_precision, interpret, h, w_blocks, t.astype(dtype))
    return out.astype(policy.accumulation_dtype)


def reference_messages(h, w, t, policy: Policy) -> jax.Array:
    """The XLA path's computation of the same messages: ``h @ w`` materialised, then one
    batched contraction."""
    rows, _ = h.shape
    _, _, j, _ = t.shape
    with jax.named_scope("radial_weights"):  # named scopes label the ops for profiles
        radial = policy.einsum("rm,mw->rw", h, w, wide_result=False).reshape(rows, -1, j)  # [R, O, J]
    with jax.named_scope("tfn_contraction"):
        return policy.einsum("roj,rsjk->rsok", radial, t)  # [R, S, O, K]
