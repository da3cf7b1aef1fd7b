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

The plan of a hidden layer of the QM9 model (4 degrees x 32 channels in, keys + values out):

>>> from se3jax.execution import FuseLevel
>>> plan = conv_plan(Fiber.create(4, 32), Fiber.create(4, 32), FuseLevel.PARTIAL_OUT, 3)
>>> plan.n_weights, len(plan.groups)
(45056, 4)
>>> [(g.out_degrees, g.in_dim, g.n_freq, g.out_dim) for g in plan.groups]
[((0,), 16, 4, 1), ((1,), 16, 10, 3), ((2,), 16, 14, 5), ((3,), 16, 16, 7)]
>>> len(conv_plan(Fiber.create(4, 32), Fiber.create(4, 32), FuseLevel.NONE, 3).groups)
16
"""

from __future__ import annotations

import dataclasses
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.custom_derivatives import SymbolicZero

from se3jax.basis import harmonics_dim, num_frequencies, path_basis_matrix
from se3jax.edges import EdgeInputs
from se3jax.execution import Execution, FuseLevel, edge_chunk_rows, remat_radial, resolve_fuse_level, resolve_kernel
from se3jax.fiber import Features, Fiber, degree_dim
from se3jax.layers.fused_kernel import fused_messages, reference_messages
from se3jax.layers.linear import LinearSE3
from se3jax.layers.radial import RadialProfile, radial_trunks, stack_trunks
from se3jax.precision import Policy, get_policy


def all_paths(max_degree: int) -> tuple[tuple[int, int], ...]:
    """Every (d_in, d_out) path for degrees 0..max_degree, in the order of the path bases."""
    return tuple((a, b) for a in range(max_degree + 1) for b in range(max_degree + 1))


@functools.cache
def path_bases_matrix(max_degree: int) -> tuple[np.ndarray, dict]:
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


def path_bases(harmonics: jax.Array, max_degree: int, policy: Policy | str = "fp32") -> jax.Array:
    """All paths' bases for each edge from stacked harmonics: ``[E, n_path_bases]``
    (one small matmul: ~2% of a hidden layer's multiply-adds). Float32 (or float64) results
    at the policy's matmul precision."""
    policy = get_policy(policy)
    q, _ = path_bases_matrix(max_degree)
    return jnp.dot(harmonics, jnp.asarray(q, harmonics.dtype), precision=policy.dot_precision)


@dataclasses.dataclass(frozen=True, eq=False)
class PathGroup:
    """Paths fused into one contraction: input degrees x output degrees of a convolution."""

    in_degrees: tuple[int, ...]
    out_degrees: tuple[int, ...]
    c_in: int
    c_out: int
    n_freq: int  # fused frequency axis F_g
    in_dim: int  # sum over in_degrees of 2d+1
    out_dim: int  # sum over out_degrees of 2d+1
    weight_index: np.ndarray  # [c_out * c_in * F_g]: columns of the canonical radial kernel
    basis_index: np.ndarray  # [in_dim * F_g * out_dim]: columns of the path bases (-1 = 0)

    def __eq__(self, other) -> bool:
        if not isinstance(other, PathGroup):
            return NotImplemented
        return all(np.array_equal(getattr(self, f.name), getattr(other, f.name)) for f in dataclasses.fields(self))

    def __hash__(self):
        return hash((self.in_degrees, self.out_degrees, self.c_in, self.c_out, self.n_freq))


@dataclasses.dataclass(frozen=True)
class ConvPlan:
    fiber_in: Fiber
    fiber_out: Fiber
    level: FuseLevel
    max_degree: int  # degree range of the shared path bases
    paths: tuple[tuple[int, int], ...]  # canonical path order of the radial kernel
    path_offsets: tuple[int, ...]  # start column of each path's block
    n_weights: int
    groups: tuple[PathGroup, ...]

    def path_columns(self, path: tuple[int, int]) -> np.ndarray:
        """The canonical kernel columns of one ``(d_in, d_out)`` path (its block ``[o, i, f]``)."""
        d_in, d_out = path
        start = self.path_offsets[self.paths.index(path)]
        return np.arange(start, start + self.fiber_out[d_out] * self.fiber_in[d_in] * num_frequencies(d_in, d_out))


def _group_degrees(level: FuseLevel, fiber_in: Fiber, fiber_out: Fiber):
    ins, outs = fiber_in.degrees, fiber_out.degrees
    if level == FuseLevel.NONE:
        return [((a,), (b,)) for b in outs for a in ins]
    if level == FuseLevel.PARTIAL_OUT:
        return [(ins, (b,)) for b in outs]
    if level == FuseLevel.PARTIAL_IN:
        return [((a,), outs) for a in ins]
    return [(ins, outs)]


@functools.cache
def conv_plan(fiber_in: Fiber, fiber_out: Fiber, level: FuseLevel, max_degree: int) -> ConvPlan:
    """Static execution plan of a convolution (numpy, built once per fiber pair and level).
    ``level`` must be one the fibers allow (:func:`se3jax.execution.resolve_fuse_level`)."""
    level = FuseLevel(level)
    if level == FuseLevel.AUTO:
        raise ValueError("conv_plan needs a concrete level: resolve 'auto' first")
    if max(fiber_in.max_degree, fiber_out.max_degree) > max_degree:
        raise ValueError(
            f"fibers {fiber_in} -> {fiber_out} need degrees above the edge harmonics' max_degree {max_degree}"
        )
    paths = tuple((a, b) for b in fiber_out.degrees for a in fiber_in.degrees)
    offsets, col = [], 0
    for a, b in paths:
        offsets.append(col)
        col += fiber_out[b] * fiber_in[a] * num_frequencies(a, b)
    path_offset = dict(zip(paths, offsets))
    _, bases_offset = path_bases_matrix(max_degree)

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
        # basis_index[l, g, k] -> column of the path bases, or -1 where the block is zero
        in_off = np.cumsum([0] + [degree_dim(a) for a in in_degrees])
        out_off = np.cumsum([0] + [degree_dim(b) for b in out_degrees])
        bidx = -np.ones((in_off[-1], n_f, out_off[-1]), np.int64)
        for g, (a, b, f) in enumerate(freqs):
            ia, ib = in_degrees.index(a), out_degrees.index(b)
            nf = num_frequencies(a, b)
            local = np.arange(degree_dim(a) * nf * degree_dim(b)).reshape(degree_dim(a), nf, degree_dim(b))
            bidx[in_off[ia] : in_off[ia + 1], g, out_off[ib] : out_off[ib + 1]] = bases_offset[(a, b)] + local[:, f, :]
        groups.append(
            PathGroup(
                in_degrees,
                out_degrees,
                c_in,
                c_out,
                n_f,
                int(in_off[-1]),
                int(out_off[-1]),
                w.reshape(-1),
                bidx.reshape(-1),
            )
        )
    return ConvPlan(fiber_in, fiber_out, level, max_degree, paths, tuple(offsets), col, tuple(groups))


def _is_column_range(idx: np.ndarray) -> bool:
    """Whether static column indices are one contiguous range (a slice, not a gather)."""
    return bool(idx[0] >= 0 and np.array_equal(idx, np.arange(idx[0], idx[0] + idx.size)))


def group_basis(bases: jax.Array, group: PathGroup) -> jax.Array:
    """The group's block-sparse basis ``[E, in_dim, F_g, out_dim]`` gathered from path bases.
    A single path's basis is a contiguous column range: a static slice (gathered, its
    transposed copies and out-of-range selects made a CPU inference step 2-5% slower)."""
    idx = group.basis_index
    if _is_column_range(idx):
        gathered = jax.lax.slice_in_dim(bases, int(idx[0]), int(idx[0]) + idx.size, axis=1)
    elif (idx >= 0).all():
        gathered = jnp.take(bases, jnp.asarray(idx), axis=1)
    else:  # zero blocks: gather from the bases with a zero column appended
        padded = jnp.concatenate([bases, jnp.zeros_like(bases[:, :1])], axis=1)
        gathered = jnp.take(padded, jnp.asarray(np.where(idx >= 0, idx, bases.shape[1])), axis=1)
    return gathered.reshape(bases.shape[0], group.in_dim, group.n_freq, group.out_dim)


def group_weights(kernel: jax.Array, group: PathGroup) -> jax.Array:
    """The group's columns of the canonical radial kernel, ``[mid, c_out * c_in * F_g]``.
    A single path's block is a contiguous column range: a static slice, whose gradient is a
    pad (a gather's is a scatter-add, ~5% of a CPU training step)."""
    idx = group.weight_index
    if _is_column_range(idx):
        return jax.lax.slice_in_dim(kernel, int(idx[0]), int(idx[0]) + idx.size, axis=1)
    return jnp.take(kernel, jnp.asarray(idx), axis=1)


def plan_weights(kernel: jax.Array, plan: ConvPlan) -> tuple[jax.Array, ...]:
    """Every group's weights (:func:`group_weights`). Groups that tile the kernel's columns in
    order (one per path, ``none``) are one ``split``, whose gradient is one concatenation:
    sliced one by one, the kernel's gradient was a sum of 16 padded blocks in every edge chunk
    (0.36 of a CPU training step's 8.9 busy seconds at batch 100)."""
    bounds = np.cumsum([0] + [g.weight_index.size for g in plan.groups])
    tiled = bounds[-1] == kernel.shape[1] and all(
        np.array_equal(g.weight_index, np.arange(bounds[k], bounds[k + 1])) for k, g in enumerate(plan.groups)
    )
    if tiled:
        return tuple(jnp.split(kernel, bounds[1:-1].tolist(), axis=1))
    return tuple(group_weights(kernel, g) for g in plan.groups)


def channels_last_weights(kernel: jax.Array, plan: ConvPlan) -> tuple[jax.Array, ...]:
    """Every group's weights (:func:`plan_weights`) laid out ``[mid, J*O]`` (``[j, o]``) instead
    of ``[mid, O*J]``: made once per layer, outside the edge-chunk loop (in every chunk, the
    transposes took 0.3 s of a 2.1 s CPU inference step at batch 100)."""
    flipped = []
    for group, w in zip(plan.groups, plan_weights(kernel, plan)):
        j = group.c_in * group.n_freq
        flipped.append(w.reshape(w.shape[0], -1, j).transpose(0, 2, 1).reshape(w.shape))
    return tuple(flipped)


# The basis contraction's x-derivative ``eifk,elfk->eil`` is a batched dot of tiny matrices, which
# XLA's CPU dots ran at ~0.5-2 GFLOP/s; for groups of at most this many columns ``(f, k)`` it runs
# as broadcast products (:func:`basis_contraction`). QM9 training at batch 100, steps alternated in
# one process: 0.918 and 0.942 of the step time (8 and 16 rounds) at 9 columns, 0.991 at 15, 1.036
# at 25; the trunk at 10^4 edges 0.96 at 9 (docs/performance.md). Measured on a CPU only.
BROADCAST_DERIVATIVE_COLUMNS = 9


def basis_einsum(x: jax.Array, basis: jax.Array, policy: Policy) -> jax.Array:
    """``tmp[e, i, f, k] = sum_l x[e, i, l] basis[e, l, f, k]`` under ``policy`` (result in its
    compute dtype)."""
    return policy.einsum("eil,elfk->eifk", x, basis, wide_result=False)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def basis_contraction(x: jax.Array, basis: jax.Array, policy: Policy) -> jax.Array:
    """:func:`basis_einsum`, whose derivative in ``x`` runs as broadcast products: the tangent is
    written per output column ``(f, k)`` as a sum over ``l``, so its transpose -- the backward
    pass -- is a sum over columns of broadcast products, one loop fusion instead of a batched dot
    of tiny matrices. The same function and derivatives (first and second, forward and reverse
    mode)."""
    return basis_einsum(x, basis, policy)


def _basis_contraction_jvp(policy, primals, tangents):
    x, basis = primals
    dx, dbasis = tangents  # symbolic zeros where not differentiated (the basis, in training)
    out = basis_contraction(x, basis, policy)
    tangent = jnp.zeros_like(out)
    if not isinstance(dx, SymbolicZero):
        acc = policy.accumulation_dtype
        columns = basis.reshape(basis.shape[0], basis.shape[1], -1).astype(acc)  # [e, l, (f, k)]
        dx = dx.astype(acc)
        per_column = [jnp.sum(dx * columns[:, None, :, c], axis=-1) for c in range(columns.shape[2])]
        tangent = jnp.stack(per_column, axis=-1).reshape(out.shape).astype(out.dtype)
    if not isinstance(dbasis, SymbolicZero):
        tangent = tangent + basis_einsum(x, dbasis, policy)
    return out, tangent


basis_contraction.defjvp(_basis_contraction_jvp, symbolic_zeros=True)


@functools.partial(jax.custom_jvp, nondiff_argnums=(3,))
def channels_last_messages(h: jax.Array, w: jax.Array, t: jax.Array, policy: Policy, w_jo: jax.Array) -> jax.Array:
    """:func:`~se3jax.layers.fused_kernel.reference_messages` (the same function and gradients)
    with the radial weights made as ``[R, J, O]`` from ``w_jo``, the same kernel as ``w`` laid
    out ``[j, o]`` (:func:`channels_last_weights`): a CPU contracts ``[S*K, J] x [J, O]`` per
    row about 2x faster than ``[O, J] x [J, S*K]`` (:func:`se3jax.execution.resolve_kernel`).

    The derivatives are the reference's, in ``h``, ``w`` and ``t``: faster in that layout, they
    make the weights as ``[R, O, J]`` again (free where the step recomputes them for the
    backward pass anyway). ``w_jo`` only saves the transposes: derivatives flow through ``w``,
    so ``w_jo`` must be ``w`` rearranged, never an independent input."""
    rows, j = h.shape[0], t.shape[2]
    with jax.named_scope("radial_weights"):
        radial = policy.einsum("rm,mw->rw", h, w_jo, wide_result=False).reshape(rows, j, -1)  # [R, J, O]
    with jax.named_scope("tfn_contraction"):
        return jnp.swapaxes(policy.einsum("rsjk,rjo->rsko", t, radial), 2, 3)  # [R, S, O, K]


@channels_last_messages.defjvp
def _channels_last_jvp(policy, primals, tangents):
    # the tangent of the reference's computation (w_jo's tangent is w's, rearranged: not added
    # twice); the reference's unused primal output is dropped by XLA
    h, w, t, w_jo = primals
    _, tangent = jax.jvp(lambda h, w, t: reference_messages(h, w, t, policy), (h, w, t), tangents[:3])
    return channels_last_messages(h, w, t, policy, w_jo), tangent


# how a group contracts its radial weights, by the resolved Execution.kernel (channels-last:
# channels_last_messages, which also takes the group's weights rearranged)
CONTRACTIONS = {"xla": reference_messages, "pallas": fused_messages}


def tfn_messages(
    plan: ConvPlan,
    hidden: jax.Array,
    weights: tuple[jax.Array, ...],
    x_src: Features,
    harmonics: jax.Array,
    policy: Policy | str = "fp32",
    paired: bool = False,
    kernel_choice: str = "xla",
    weights_channels_last: tuple[jax.Array, ...] | None = None,
) -> Features:
    """Per-edge TFN messages ``{d_out: [E, c_out, 2 d_out + 1]}`` (at least float32).

    ``hidden`` [R, mid] is the radial MLP's last activation, one row R per edge (or per bond if
    ``paired``), and ``weights`` its last kernel's columns for each group (:func:`plan_weights`);
    ``x_src`` holds source-node features per degree ``[E, c_in, 2d+1]``; ``harmonics`` the
    stacked spherical harmonics ``[E, (2 max_degree + 1)^2]``, from which the path bases are
    built here (49 numbers per edge kept instead of 1,092). Contractions run in the policy's
    dtype and matmul precision and return at least float32.

    ``paired``: edges ``2k, 2k+1`` are the two directions of bond ``k``: the radial weights
    (the dominant cost) are computed once per bond and contracted with both directions.
    ``kernel_choice``: a resolved ``Execution.kernel``; the same function. ``xla_channels_last``
    also takes ``weights_channels_last`` (:func:`channels_last_weights`, made once per layer).
    """
    policy = get_policy(policy)
    num_edges = x_src[next(iter(x_src))].shape[0]
    num_rows = hidden.shape[0]
    if num_rows * (2 if paired else 1) != num_edges:
        raise ValueError(f"{num_rows} radial rows for {num_edges} edges (paired={paired})")
    # named scopes label the ops for profiles (se3jax.profiling)
    with jax.named_scope("basis"):
        bases = path_bases(harmonics, plan.max_degree, policy)  # [E, n_path_bases]
    h = hidden.astype(policy.compute_dtype)  # [R, mid]
    if kernel_choice == "xla_channels_last" and weights_channels_last is None:
        raise ValueError("kernel 'xla_channels_last' needs weights_channels_last (channels_last_weights)")
    out = {}
    for index, (group, w) in enumerate(zip(plan.groups, weights)):
        with jax.named_scope("basis"):
            basis = group_basis(bases, group)  # [E, l, f, k]
        with jax.named_scope("tfn_contraction"):
            x = jnp.concatenate([x_src[a] for a in group.in_degrees], axis=-1)  # [E, i, l]
            broadcast = (
                kernel_choice == "xla_channels_last" and group.n_freq * group.out_dim <= BROADCAST_DERIVATIVE_COLUMNS
            )
            tmp = (basis_contraction if broadcast else basis_einsum)(x, basis, policy)  # [E, i, f, k]
        # the group's per-row radial weights are h @ w ([mid, o*i*f]), laid out as [R, o, (i, f)]
        t = tmp.reshape(num_rows, 2 if paired else 1, group.c_in * group.n_freq, group.out_dim)  # [R, S, j, k]
        if kernel_choice == "xla_channels_last":
            msg = channels_last_messages(h, w, t, policy, weights_channels_last[index])
        else:
            msg = CONTRACTIONS[kernel_choice](h, w, t, policy)
        msg = msg.reshape(num_edges, group.c_out, group.out_dim)  # [E, o, k]
        start = 0
        for b in group.out_degrees:
            piece = msg[..., start : start + degree_dim(b)]
            out[b] = piece if b not in out else out[b] + piece
            start += degree_dim(b)
    return out


def chunked_edge_map(fn, num_rows: int, chunk: int | None, *row_args):
    """Apply ``fn`` to rows in chunks of ``chunk`` (a sequential loop), or all at once.

    ``fn`` maps pytrees of ``[R_chunk, ...]`` arrays to a pytree of ``[R_chunk, ...]``.
    Chunking bounds the live per-edge radial weights to one chunk, which cuts peak memory
    (and keeps them in cache on a CPU); the row count is padded up to a multiple of ``chunk``
    with zero rows.
    """
    if not chunk or chunk >= num_rows:
        return fn(*row_args)
    n_chunks = -(-num_rows // chunk)
    pad = n_chunks * chunk - num_rows

    def split(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    stacked = jax.lax.map(lambda args: fn(*args), jax.tree.map(split, row_args))
    return jax.tree.map(lambda y: y.reshape((n_chunks * chunk,) + y.shape[2:])[:num_rows], stacked)


def by_bond(x: jax.Array) -> jax.Array:
    """Per-edge array -> ``[bonds, 2, ...]`` (paired edges: a bond's two directions)."""
    return x.reshape((-1, 2) + x.shape[1:])


def by_edge(x: jax.Array) -> jax.Array:
    """``[bonds, 2, ...]`` -> per-edge array (inverse of :func:`by_bond`)."""
    return x.reshape((-1,) + x.shape[2:])


def edge_messages(
    plan: ConvPlan,
    radial_hidden,
    kernel: jax.Array,
    features: Features,
    policy: Policy,
    paired: bool,
    kernel_choice: str,
    weights_channels_last: tuple[jax.Array, ...] | None,
    scalars: jax.Array,
    harmonics: jax.Array,
    senders: jax.Array,
) -> Features:
    """Messages of one chunk of rows (edges, or bonds with their two directions if ``paired``):
    runs the radial network's hidden layers (``radial_hidden``, see RadialProfile), gathers the
    source features and builds the bases inside the chunk, so only node-sized arrays and a few
    numbers per edge (scalars, 49 harmonics) stay live across chunks."""
    if paired:
        harmonics, senders = by_edge(harmonics), by_edge(senders)
    with jax.named_scope("radial"):
        hidden = radial_hidden(scalars)
    with jax.named_scope("gather"):
        x_src = {d: x[senders] for d, x in features.items()}
    # split in every chunk: split once before the loop, the groups' copies were kept for the
    # backward pass (+33 MB of XLA temporaries at batch 100), for the same speed
    weights = plan_weights(kernel, plan)
    out = tfn_messages(plan, hidden, weights, x_src, harmonics, policy, paired, kernel_choice, weights_channels_last)
    return {d: by_bond(m) for d, m in out.items()} if paired else out


class ConvSE3(nn.Module):
    """SE(3)-equivariant TFN convolution from ``fiber_in`` to ``fiber_out``.

    Call with node features ``{d: [N, C_d, 2d+1]}`` and the :class:`~se3jax.edges.EdgeInputs`
    of the graph. Returns ``{d: [N, C_d, 2d+1]}`` summed over incoming real edges, plus a
    per-degree self-interaction ``W x`` of each node's own features when ``self_interaction``
    is set: ``per_edge`` adds it once per incoming real edge (NVIDIA's reference: the term is
    scaled by the node's in-degree), ``per_node`` once (or the per-edge messages
    ``{d: [E, C_d, 2d+1]}`` when ``return_messages``).

    How it runs (fusion level, precision, edge chunks, rematerialisation of the per-edge
    radial weights, paired edges) comes from ``execution`` and never changes the parameters.
    """

    fiber_in: Fiber
    fiber_out: Fiber
    self_interaction: str = ""  # "" none; "per_edge" (the reference's) or "per_node"
    return_messages: bool = False  # attention wants per-edge outputs, not node sums
    execution: Execution = Execution()

    def plan(self, max_degree: int, backend: str | None = None) -> ConvPlan:
        level = resolve_fuse_level(
            self.execution.fuse_level, self.fiber_in, self.fiber_out, backend, self.execution.mode
        )
        return conv_plan(self.fiber_in, self.fiber_out, level, max_degree)

    @nn.compact
    def __call__(self, features: Features, edges: EdgeInputs) -> Features:
        self.fiber_in.check_features(features, f"{type(self).__name__} input")
        features = {d: jnp.asarray(x) for d, x in features.items()}  # numpy inputs welcome
        execution = self.execution
        plan = self.plan(edges.max_degree)
        policy = get_policy(execution.precision)
        paired = execution.paired_edges
        num_edges = edges.senders.shape[0]
        if paired and num_edges % 2:
            raise ValueError(f"paired edges need an even edge count, got {num_edges}")
        # both directions of a bond share length and bond features: one radial row per bond
        scalars = edges.scalars[0::2] if paired else edges.scalars
        trunks = radial_trunks(self.fiber_in, self.fiber_out, edges.max_degree)
        outputs, columns = [], []
        for t, paths in enumerate(trunks):
            columns.append(np.concatenate([plan.path_columns(p) for p in paths]))
            name = "radial" if len(trunks) == 1 else f"radial_{t}"
            outputs.append(RadialProfile(len(columns[-1]), execution=execution, name=name)(scalars))
        hidden, kernel = stack_trunks(outputs, columns, plan.n_weights)
        rows = scalars.shape[0]
        chunk = edge_chunk_rows(execution, rows, plan.n_weights)
        remat = remat_radial(execution, rows, plan.n_weights, chunked=chunk is not None)
        kernel_choice = resolve_kernel(execution, remat)
        # rearranged once here, not in every chunk
        flipped = channels_last_weights(kernel, plan) if kernel_choice == "xla_channels_last" else None
        messages = functools.partial(
            edge_messages, plan, hidden, kernel, features, policy, paired, kernel_choice, flipped
        )
        if remat:
            messages = jax.checkpoint(messages)
        per_row = (by_bond(edges.harmonics), by_bond(edges.senders)) if paired else (edges.harmonics, edges.senders)
        msgs = chunked_edge_map(messages, rows, chunk, scalars, *per_row)
        if paired:
            msgs = {d: by_edge(m) for d, m in msgs.items()}
        msgs = {d: jnp.where(edges.mask[:, None, None], m, 0.0) for d, m in msgs.items()}
        if self.return_messages:
            return msgs
        num_nodes = next(iter(features.values())).shape[0]
        with jax.named_scope("segment_sum"):
            out = {d: jax.ops.segment_sum(m, edges.receivers, num_nodes) for d, m in msgs.items()}
        if self.self_interaction not in ("", "per_edge", "per_node"):
            raise ValueError(f"self_interaction must be '', 'per_edge' or 'per_node', got {self.self_interaction!r}")
        if self.self_interaction:
            shared = self.fiber_in.restrict(self.fiber_out.degrees)
            if shared.degrees:
                si = LinearSE3(
                    shared, self.fiber_out.restrict(shared.degrees), execution=execution, name="self_interaction"
                )({d: features[d] for d in shared.degrees})
                if self.self_interaction == "per_edge":
                    # the reference adds W x_dst to every incoming edge's message before the
                    # sum: the node's own term counts once per incoming real edge
                    weight = jax.ops.segment_sum(
                        edges.mask.astype(si[next(iter(si))].dtype), edges.receivers, num_nodes
                    )
                    si = {d: x * weight[:, None, None] for d, x in si.items()}
                out = {d: out[d] + si[d] if d in si else out[d] for d in out}
        return out
