"""TFN convolution (ConvSE3) with four execution levels that never change the result.

For each path ``(d_in, d_out)`` and edge ``e`` (source ``s``)::

    msg_dout[e, o, k] = sum_{d_in, i, l, f} R[e, o, i, f] * x_din[s, i, l] * basis[e, l, f, k]

summed into the destination node; ``R`` comes from the radial MLP. Paths are executed in
*groups*: a group fuses several input degrees (concatenated along the component axis) and
several output degrees into one block-sparse basis and one weight matrix, so a group is
two einsums plus one matmul whatever its size.

- ``NONE``: one group per path (16 for degrees 0..3): fewest multiply-adds.
- ``PARTIAL_OUT``: one group per output degree (needs equal input channels).
- ``PARTIAL_IN``: one group per input degree (needs equal output channels).
- ``FULL``: one group for everything (needs both): fewest ops, most multiply-adds.

The parameters are the same at every level: one radial MLP whose last kernel holds every
path's weights in a canonical layout (path blocks ``[c_out, c_in, F]`` in ``plan.paths``
order). A level only changes which static column gather of that kernel each group uses,
so a checkpoint trained at one level runs at any other with the same outputs.
"""

from __future__ import annotations

import dataclasses
import enum
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from se3jax.basis import harmonics_dim, num_frequencies, path_basis_matrix
from se3jax.fiber import Fiber, degree_dim
from se3jax.layers.linear import LinearSE3
from se3jax.layers.radial import RadialProfile, scaled_normal_columns
from se3jax.precision import accumulation_dtype, get_policy


class FuseLevel(str, enum.Enum):
    NONE = "none"
    PARTIAL_OUT = "partial_out"
    PARTIAL_IN = "partial_in"
    FULL = "full"
    AUTO = "auto"


def allowed_levels(fiber_in: Fiber, fiber_out: Fiber) -> tuple[FuseLevel, ...]:
    """The levels the fibers permit (fusing degrees needs equal channel counts)."""
    levels = [FuseLevel.NONE]
    if fiber_in.uniform_channels is not None and len(fiber_in.degrees) > 1:
        levels.append(FuseLevel.PARTIAL_OUT)
    if fiber_out.uniform_channels is not None and len(fiber_out.degrees) > 1:
        levels.append(FuseLevel.PARTIAL_IN)
    if (fiber_in.uniform_channels is not None and fiber_out.uniform_channels is not None
            and len(fiber_in.degrees) * len(fiber_out.degrees) > 1):
        levels.append(FuseLevel.FULL)
    return tuple(levels)


# Fastest level per backend. CPU, measured with `scripts/benchmark.py --fuse-level ...` on the
# 2-core project machine (QM9 model, batch 100, paired edges): training none 29-30 mol/s,
# partial_out 27-28, partial_in 21, full 14; inference partial_out 172, none 162 -- training
# is the heavy workload, so none first. Wider groups mean fewer, bigger ops but more
# multiply-adds: the GPU order is the reference's choice, not yet measured here.
_PREFERENCE = {
    "cpu": (FuseLevel.NONE,),
    "gpu": (FuseLevel.FULL, FuseLevel.PARTIAL_OUT, FuseLevel.PARTIAL_IN, FuseLevel.NONE),
}


def resolve_level(level: "FuseLevel | str", fiber_in: Fiber, fiber_out: Fiber,
                  backend: str | None = None) -> FuseLevel:
    """Turn ``auto`` into the fastest allowed level for the backend; check a forced level."""
    level = FuseLevel(level)
    allowed = allowed_levels(fiber_in, fiber_out)
    if level == FuseLevel.AUTO:
        backend = backend or jax.default_backend()
        for candidate in _PREFERENCE.get(backend, _PREFERENCE["gpu"]):
            if candidate in allowed:
                return candidate
        return FuseLevel.NONE
    if level not in allowed:
        # A forced level the fibers cannot do falls back to the widest one they can: a
        # model-wide setting must still work on layers with ragged fibers (first/last).
        order = [FuseLevel.FULL, FuseLevel.PARTIAL_OUT, FuseLevel.PARTIAL_IN, FuseLevel.NONE]
        return next(l for l in order[order.index(level):] if l in allowed)
    return level


def all_paths(max_degree: int) -> tuple[tuple[int, int], ...]:
    """Every (d_in, d_out) path for degrees 0..max_degree, in pair-basis order."""
    return tuple((a, b) for a in range(max_degree + 1) for b in range(max_degree + 1))


@functools.lru_cache(maxsize=None)
def pair_basis_matrix(max_degree: int) -> tuple[np.ndarray, dict]:
    """Q for all paths at once: ``Y @ Q`` gives every path's basis, flattened and concatenated
    (1,092 numbers per edge for degrees 0..3), plus each path's column offset."""
    rows = harmonics_dim(2 * max_degree)
    blocks, offsets, col = [], {}, 0
    for d_in, d_out in all_paths(max_degree):
        q = path_basis_matrix(d_in, d_out)
        blocks.append(np.pad(q, ((0, rows - q.shape[0]), (0, 0))))
        offsets[(d_in, d_out)] = col
        col += q.shape[1]
    q = np.concatenate(blocks, axis=1)  # float64; cast to the harmonics dtype when used
    return q, offsets


def pair_bases(harmonics: jax.Array, max_degree: int) -> jax.Array:
    """All paths' bases for each edge from stacked harmonics: ``[E, n_pair_basis]``
    (one small matmul: ~2% of a hidden layer's multiply-adds)."""
    q, _ = pair_basis_matrix(max_degree)
    return jnp.dot(harmonics, jnp.asarray(q, harmonics.dtype))


@dataclasses.dataclass(frozen=True)
class PathGroup:
    in_degrees: tuple[int, ...]
    out_degrees: tuple[int, ...]
    c_in: int
    c_out: int
    n_freq: int                # fused frequency axis F_g
    in_dim: int                # sum over in_degrees of 2d+1
    out_dim: int               # sum over out_degrees of 2d+1
    weight_index: np.ndarray   # [c_out * c_in * F_g]: columns of the canonical radial kernel
    basis_index: np.ndarray    # [in_dim * F_g * out_dim]: columns of the pair bases (-1 = 0)

    def __hash__(self):
        return hash((self.in_degrees, self.out_degrees, self.c_in, self.c_out))


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    fiber_in: Fiber
    fiber_out: Fiber
    level: FuseLevel
    max_degree: int                     # degree range of the shared pair bases
    paths: tuple[tuple[int, int], ...]  # canonical path order of the radial kernel
    path_offsets: tuple[int, ...]       # start column of each path's block
    n_weights: int
    groups: tuple[PathGroup, ...]

    @property
    def weight_fan_in(self) -> np.ndarray:
        """Per canonical column: how many terms feed its output (for initialisation)."""
        fan = np.zeros(self.n_weights)
        for (d_in, d_out), off in zip(self.paths, self.path_offsets):
            n = self.fiber_out[d_out] * self.fiber_in[d_in] * num_frequencies(d_in, d_out)
            total = sum(self.fiber_in[a] * num_frequencies(a, d_out) for a in self.fiber_in.degrees)
            fan[off:off + n] = total
        return fan


def _group_degrees(level: FuseLevel, fiber_in: Fiber, fiber_out: Fiber):
    ins, outs = fiber_in.degrees, fiber_out.degrees
    if level == FuseLevel.NONE:
        return [((a,), (b,)) for b in outs for a in ins]
    if level == FuseLevel.PARTIAL_OUT:
        return [(ins, (b,)) for b in outs]
    if level == FuseLevel.PARTIAL_IN:
        return [((a,), outs) for a in ins]
    return [(ins, outs)]


@functools.lru_cache(maxsize=None)
def conv_plan(fiber_in: Fiber, fiber_out: Fiber, level: FuseLevel, max_degree: int) -> ConvPlan:
    """Static execution plan of a convolution (numpy, built once per fiber pair and level)."""
    level = resolve_level(level, fiber_in, fiber_out)
    paths = tuple((a, b) for b in fiber_out.degrees for a in fiber_in.degrees)
    offsets, col = [], 0
    for a, b in paths:
        offsets.append(col)
        col += fiber_out[b] * fiber_in[a] * num_frequencies(a, b)
    path_offset = dict(zip(paths, offsets))
    _, pair_offset = pair_basis_matrix(max_degree)

    groups = []
    for in_degrees, out_degrees in _group_degrees(level, fiber_in, fiber_out):
        c_in, c_out = fiber_in[in_degrees[0]], fiber_out[out_degrees[0]]
        freqs = [(a, b, f) for b in out_degrees for a in in_degrees for f in range(num_frequencies(a, b))]
        n_f = len(freqs)
        # weight_index[o, i, g] -> canonical column of path (a, b), entry (o, i, f)
        w = np.empty((c_out, c_in, n_f), np.int64)
        for g, (a, b, f) in enumerate(freqs):
            o, i = np.meshgrid(np.arange(c_out), np.arange(c_in), indexing="ij")
            w[:, :, g] = path_offset[(a, b)] + (o * c_in + i) * num_frequencies(a, b) + f
        # basis_index[l, g, k] -> column of the pair bases, or -1 where the block is zero
        in_off = np.cumsum([0] + [degree_dim(a) for a in in_degrees])
        out_off = np.cumsum([0] + [degree_dim(b) for b in out_degrees])
        bidx = -np.ones((in_off[-1], n_f, out_off[-1]), np.int64)
        for g, (a, b, f) in enumerate(freqs):
            ia, ib = in_degrees.index(a), out_degrees.index(b)
            nf = num_frequencies(a, b)
            local = np.arange(degree_dim(a) * nf * degree_dim(b)).reshape(degree_dim(a), nf, degree_dim(b))
            bidx[in_off[ia]:in_off[ia + 1], g, out_off[ib]:out_off[ib + 1]] = pair_offset[(a, b)] + local[:, f, :]
        groups.append(PathGroup(in_degrees, out_degrees, c_in, c_out, n_f, int(in_off[-1]),
                                int(out_off[-1]), w.reshape(-1), bidx.reshape(-1)))
    return ConvPlan(fiber_in, fiber_out, level, max_degree, paths, tuple(offsets), col, tuple(groups))


def group_basis(bases: jax.Array, group: PathGroup) -> jax.Array:
    """The group's block-sparse basis ``[E, in_dim, F_g, out_dim]`` gathered from pair bases."""
    idx = group.basis_index
    if (idx >= 0).all():
        gathered = jnp.take(bases, jnp.asarray(idx), axis=1)
    else:  # zero blocks: gather from the bases with a zero column appended
        padded = jnp.concatenate([bases, jnp.zeros_like(bases[:, :1])], axis=1)
        gathered = jnp.take(padded, jnp.asarray(np.where(idx >= 0, idx, bases.shape[1])), axis=1)
    return gathered.reshape(bases.shape[0], group.in_dim, group.n_freq, group.out_dim)


def tfn_messages(plan: ConvPlan, hidden: jax.Array, kernel: jax.Array, x_src: dict,
                 harmonics: jax.Array, compute_dtype=jnp.float32, paired: bool = False) -> dict:
    """Per-edge TFN messages ``{d_out: [E, c_out, 2 d_out + 1]}`` (at least float32).

    ``hidden`` [E, mid] and ``kernel`` [mid, n_weights] are the radial MLP's last activation
    and kernel; ``x_src`` holds source-node features per degree ``[E, c_in, 2d+1]``;
    ``harmonics`` the stacked spherical harmonics ``[E, (2 max_degree + 1)^2]``, from which
    the pair bases are built here (49 numbers per edge kept instead of 1,092). Contractions
    run in ``compute_dtype`` and return at least float32.

    ``paired``: edges ``2k, 2k+1`` are the two directions of bond ``k`` and ``hidden`` has one
    row per bond: the radial weights (the dominant cost) are computed once per bond and
    contracted with both directions.
    """
    num_edges = x_src[next(iter(x_src))].shape[0]
    num_rows = hidden.shape[0]  # bonds if paired, else edges
    if num_rows * (2 if paired else 1) != num_edges:
        raise ValueError(f"{num_rows} radial rows for {num_edges} edges (paired={paired})")
    out_dtype = accumulation_dtype(compute_dtype)
    bases = pair_bases(harmonics, plan.max_degree)
    h = hidden.astype(compute_dtype)
    out = {}
    for group in plan.groups:
        x = jnp.concatenate([x_src[a] for a in group.in_degrees], axis=-1).astype(compute_dtype)
        basis = group_basis(bases, group).astype(compute_dtype)
        # tmp[e, i, f, k] = sum_l x[e, i, l] basis[e, l, f, k]
        tmp = jnp.einsum("eil,elfk->eifk", x, basis)
        # per-edge weights of the group, already laid out as [e, o, (i, f)]
        w = jnp.take(kernel, jnp.asarray(group.weight_index), axis=1).astype(compute_dtype)
        radial = jnp.dot(h, w).reshape(num_rows, group.c_out, group.c_in * group.n_freq)
        if paired:  # one radial matrix per bond, applied to both of its directions
            tmp = tmp.reshape(num_rows, 2, -1, group.out_dim)
            msg = jnp.einsum("boj,bsjk->bsok", radial, tmp, preferred_element_type=out_dtype)
            msg = msg.reshape(num_edges, group.c_out, group.out_dim)
        else:
            msg = jnp.einsum("eoj,ejk->eok", radial, tmp.reshape(num_edges, -1, group.out_dim),
                             preferred_element_type=out_dtype)
        start = 0
        for b in group.out_degrees:
            piece = msg[..., start:start + degree_dim(b)]
            out[b] = piece if b not in out else out[b] + piece
            start += degree_dim(b)
    return out


def chunked_edge_map(fn, num_edges: int, chunk: int | None, *edge_args):
    """Apply ``fn`` to edges in chunks of ``chunk`` (a sequential loop), or all at once.

    ``fn`` maps pytrees of ``[E_chunk, ...]`` arrays to a pytree of ``[E_chunk, ...]``.
    Chunking bounds the live per-edge radial weights to one chunk (cache-sized), which cuts
    peak memory; the edge count is padded up to a multiple of ``chunk`` with zero edges.
    """
    if not chunk or chunk >= num_edges:
        return fn(*edge_args)
    n_chunks = -(-num_edges // chunk)
    pad = n_chunks * chunk - num_edges

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    stacked = jax.lax.map(lambda args: fn(*args), jax.tree.map(split, edge_args))
    return jax.tree.map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2:])[:num_edges], stacked)


class ConvSE3(nn.Module):
    """SE(3)-equivariant TFN convolution from ``fiber_in`` to ``fiber_out``.

    Call with node features ``{d: [N, C_d, 2d+1]}``, the edge scalars ``[E, F_edge]`` (bond
    features with the edge length appended), the stacked edge harmonics ``[E, (2L+1)^2]``
    (:func:`se3jax.basis.edge_geometry`), ``senders``/``receivers`` and the edge mask.
    Returns ``{d: [N, C_d, 2d+1]}`` summed over incoming real edges, plus a per-degree
    self-interaction when ``self_interaction``.

    ``edge_chunk`` processes edges in chunks (lower peak memory); ``remat`` recomputes the
    per-edge radial weights in the backward pass instead of storing them (they are the
    largest tensor of the model: ~45k numbers per edge per layer). Source features are
    gathered and bases built inside each chunk, so per layer only node-sized and 49-wide
    per-edge arrays are kept for the backward pass. ``paired_edges``: edges ``2k, 2k+1`` are
    the two directions of one bond (:func:`se3jax.graphs.edges_are_paired`), so their radial
    weights are equal and computed once.
    """

    fiber_in: Fiber
    fiber_out: Fiber
    max_degree: int
    fuse_level: FuseLevel | str = FuseLevel.AUTO
    self_interaction: bool = False
    precision: str = "fp32"
    edge_chunk: int | None = None
    remat: bool = True
    return_messages: bool = False  # attention wants per-edge outputs, not node sums
    paired_edges: bool = False     # edges 2k, 2k+1 are one bond's two directions (graphs.py)

    def plan(self) -> ConvPlan:
        return conv_plan(self.fiber_in, self.fiber_out, FuseLevel(self.fuse_level), self.max_degree)

    @nn.compact
    def __call__(self, features: dict, edge_scalars: jax.Array, harmonics: jax.Array,
                 senders: jax.Array, receivers: jax.Array, edge_mask: jax.Array):
        self.fiber_in.check_features(features, f"{type(self).__name__} input")
        features = {d: jnp.asarray(x) for d, x in features.items()}  # numpy inputs welcome
        plan = self.plan()
        column_scale = 1.0 / np.sqrt(plan.weight_fan_in)
        compute_dtype = get_policy(self.precision).compute_dtype
        paired = self.paired_edges
        num_edges = senders.shape[0]
        if paired and num_edges % 2:
            raise ValueError(f"paired edges need an even edge count, got {num_edges}")
        # both directions of a bond share length and bond features: one radial row per bond
        hidden, kernel = RadialProfile(plan.n_weights, scaled_normal_columns(column_scale),
                                       name="radial")(edge_scalars[0::2] if paired else edge_scalars)
        # Work is split over rows: bonds if paired (per-edge arrays viewed as [E/2, 2, ...]),
        # else edges.
        def group_rows(x):
            return x.reshape((-1, 2) + x.shape[1:]) if paired else x

        def flat_rows(x):
            return x.reshape((-1,) + x.shape[2:]) if paired else x

        def messages(hidden, harmonics, senders):
            harmonics, senders = flat_rows(harmonics), flat_rows(senders)
            x_src = {d: x[senders] for d, x in features.items()}
            out = tfn_messages(plan, hidden, kernel, x_src, harmonics, compute_dtype, paired)
            return {d: group_rows(m) for d, m in out.items()}

        if self.remat:
            messages = jax.checkpoint(messages)
        rows = hidden.shape[0]
        chunk = self.edge_chunk // 2 if (paired and self.edge_chunk) else self.edge_chunk
        msgs = chunked_edge_map(messages, rows, chunk, hidden, group_rows(harmonics), group_rows(senders))
        msgs = {d: flat_rows(m) for d, m in msgs.items()}
        msgs = {d: jnp.where(edge_mask[:, None, None], m, 0.0) for d, m in msgs.items()}
        if self.return_messages:
            return msgs
        num_nodes = next(iter(features.values())).shape[0]
        out = {d: jax.ops.segment_sum(m, receivers, num_nodes) for d, m in msgs.items()}
        if self.self_interaction:
            shared = self.fiber_in.restrict(self.fiber_out.degrees)
            if shared.degrees:
                si = LinearSE3(shared, self.fiber_out.restrict(shared.degrees),
                               name="self_interaction")({d: features[d] for d in shared.degrees})
                out = {d: out[d] + si[d] if d in si else out[d] for d in out}
        return out
