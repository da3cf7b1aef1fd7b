"""Radius graphs that scale: cell lists under ``jit`` (``O(N)`` time and memory, fixed output
shapes) and a host path through the ``vesin`` neighbour-list library, for open and periodic
systems. Both return the :class:`~se3jax.point_clouds.PointCloudGraph` of
:func:`se3jax.point_clouds.radius_graph` (paired edges: ``2k`` and ``2k+1`` are the two
directions of one pair), with ``shifts``: the edge vector of edge ``e`` is
``positions[receivers[e]] - positions[senders[e]] + shifts[e] @ cell`` (what
:func:`se3jax.edges.edge_inputs` computes when given ``shifts`` and ``cell``).

Periodic cells follow ASE: ``cell`` is ``[3, 3]`` with the lattice vectors as rows (any
skew), ``pbc`` says per axis whether it is periodic. A cell narrower than the cutoff along a
periodic axis gives several images of the same pair (and edges from a point to its own
images); each image is one pair of edges.

Which builder (measured by ``scripts/neighbour_lists.py`` on the 2-core CPU, float32, water
density 0.1 atoms/A^3, cutoff 5 A, ~52 neighbours per atom; see the README):

- :func:`host_radius_graph` (vesin, C++) on a CPU at every size, on the host or inside ``jit``
  (a host callback with fixed shapes): 10^5 points in 0.54 s inside ``jit``, 0.46 s on the host;
- :func:`cell_list_radius_graph` (pure JAX) on an accelerator, where the graph is built on the
  device next to the model (on the CPU it is 4-5x slower than vesin: 2.9 s at 10^5 points);
- :func:`se3jax.point_clouds.radius_graph` (all pairs, ``[N, N]``, no periodic images) for
  small open sets (0.02 s at 10^3 points, 2.3 s at 10^4).

:func:`build_radius_graph` picks the first two by backend (:func:`resolve_builder`);
:func:`build_knn_graph` likewise a k-d tree on the host or all pairs on the device.

>>> import numpy as np
>>> cell = np.eye(3) * 3.0
>>> points = np.array([[0.2, 0.0, 0.0], [2.9, 0.0, 0.0]])  # 0.3 apart through the boundary
>>> g = cell_list_radius_graph(points, cutoff=1.0, max_neighbours=4, cell=cell, pbc=True)
>>> g.senders[g.mask].tolist(), g.receivers[g.mask].tolist(), g.shifts[g.mask].tolist()
([1, 0], [0, 1], [[1, 0, 0], [-1, 0, 0]])
>>> h = host_radius_graph(points, cutoff=1.0, max_neighbours=4, cell=cell, pbc=True)
>>> h.senders[h.mask].tolist(), h.shifts[h.mask].tolist()  # the same pair, the other way first
([0, 1], [[-1, 0, 0], [1, 0, 0]])
"""

from __future__ import annotations

import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import scipy.spatial
import vesin

from se3jax.point_clouds import PointCloudGraph, knn_graph

# Spatial hashing primes (Teschner et al. 2003): bins of unbounded integer coordinates map to
# a fixed table; bins sharing a bucket are told apart by an exact coordinate comparison.
_HASH_PRIMES = (73856093, 19349663, 83492791, 50331653)


def normalise_pbc(pbc) -> tuple[bool, bool, bool]:
    """``pbc`` as three Python bools (one per cell vector): a bool, or three of them."""
    flags = np.broadcast_to(np.asarray(pbc, bool), (3,))
    return tuple(bool(f) for f in flags)


def cell_heights(cell: jax.Array) -> jax.Array:
    """Distances between the opposite faces of the cell ``[3]`` (a skewed cell's widths)."""
    a, b, c = cell[0], cell[1], cell[2]
    volume = jnp.abs(jnp.dot(a, jnp.cross(b, c)))
    areas = jnp.stack(
        [jnp.linalg.norm(jnp.cross(b, c)), jnp.linalg.norm(jnp.cross(c, a)), jnp.linalg.norm(jnp.cross(a, b))]
    )
    return volume / areas


def _concrete(cell) -> np.ndarray | None:
    """The cell as float64 numpy, or None if it is traced (inside ``jit``, ``grad``...)."""
    try:
        return np.asarray(cell, np.float64)
    except (jax.errors.TracerArrayConversionError, jax.errors.ConcretizationTypeError):
        return None


def _validated_cell(cell, pbc: tuple[bool, bool, bool], dtype):
    if cell is None:
        if any(pbc):
            raise ValueError("periodic boundary conditions need a cell ([3, 3], lattice vectors as rows)")
        return None
    if np.shape(cell) != (3, 3):
        raise ValueError(f"cell must be [3, 3] (lattice vectors as rows), got {tuple(np.shape(cell))}")
    concrete = _concrete(cell)
    if concrete is not None and abs(np.linalg.det(concrete)) < 1e-9:
        raise ValueError(f"the cell is singular (volume {np.linalg.det(concrete):.3g}): {concrete.tolist()}")
    return jnp.asarray(cell, dtype)


def images_per_axis(cell, pbc, cutoff: float) -> tuple[int, int, int]:
    """How many bins (hence images) each side the search must reach per axis: 1, or more
    where a periodic cell is narrower than the cutoff. Needs a concrete cell; a traced one
    gets 1 per axis (too narrow a traced cell is then reported as an overflow)."""
    pbc = normalise_pbc(pbc)
    concrete = None if cell is None else _concrete(cell)
    if concrete is None:
        return (1, 1, 1)
    volume = abs(np.linalg.det(concrete))
    heights = [volume / np.linalg.norm(np.cross(concrete[(a + 1) % 3], concrete[(a + 2) % 3])) for a in range(3)]
    return tuple(max(1, math.ceil(cutoff / h)) if periodic and h < cutoff else 1 for h, periodic in zip(heights, pbc))


def _times_cell(images: jax.Array, cell: jax.Array) -> jax.Array:
    """``images @ cell`` elementwise: exact whatever a backend's default matmul precision."""
    return jnp.sum(images[..., :, None] * cell, axis=-2)


def _hash(bins: jax.Array, segments: jax.Array, table_size: int) -> jax.Array:
    key = segments.astype(jnp.uint32) * jnp.uint32(_HASH_PRIMES[3])
    for axis in range(3):
        key = key ^ (bins[..., axis].astype(jnp.uint32) * jnp.uint32(_HASH_PRIMES[axis]))
    return (key & jnp.uint32(table_size - 1)).astype(jnp.int32)


def cell_list_radius_graph(
    points: jax.Array,
    cutoff: float,
    max_neighbours: int,
    cell: jax.Array | None = None,
    pbc=False,
    mask: jax.Array | None = None,
    segment_ids: jax.Array | None = None,
    bin_capacity: int | None = None,
    chunk: int = 1024,
    max_edges: int | None = None,
) -> PointCloudGraph:
    """Every pair of real points closer than ``cutoff`` (through periodic images where
    ``pbc``), paired, padded to ``max_edges`` edges (default ``N * max_neighbours``: room for
    every point's maximum; a total near the expected count, ~1.1x, saves the model that much
    work on padding edges), in ``O(N)`` time and memory.

    Points are binned on a grid of cell-aligned bins at least ``cutoff`` wide (hashed into a
    table of ~2N buckets, so open systems of any extent need no bounding box); each point
    examines the ``bin_capacity`` first points of 14 of the 27 bins around it (the half shell:
    each pair is found once, from one end; more bins along
    periodic axes narrower than the cutoff). ``overflow`` counts the edges beyond
    ``max_neighbours`` per node and beyond the budget, plus the points a full bin hid from a
    neighbour (so 0 means nothing was missed; :func:`~se3jax.point_clouds.check_graph` raises
    otherwise). ``bin_capacity`` defaults to ``max_neighbours``: raise it if the overflow says
    so; lower it for speed (the work per point is ``14 * bin_capacity``).

    ``cell`` ``[3, 3]`` (lattice vectors as rows) and ``pbc`` (a bool or three) as in ASE;
    without a cell the system is open. The cell may be traced (a constant-pressure
    simulation), but then the number of images is fixed at one per axis. ``mask`` ``[N]``
    marks real points; ``segment_ids`` ``[N]`` keeps the graphs of a batch apart. ``chunk``
    points are processed at a time (memory ``chunk * 14 * bin_capacity``).
    """
    points = jnp.asarray(points)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(points.shape)}")
    if not jnp.issubdtype(points.dtype, jnp.floating):
        points = points.astype(jnp.float32)
    n = points.shape[0]
    if cutoff <= 0 or max_neighbours < 1:
        raise ValueError(f"need cutoff > 0 and max_neighbours >= 1, got {cutoff}, {max_neighbours}")
    pbc = normalise_pbc(pbc)
    given_cell = cell  # concrete or traced: decides the static number of images
    cell = _validated_cell(cell, pbc, points.dtype)
    search = images_per_axis(given_cell, pbc, cutoff)
    capacity = max_neighbours if bin_capacity is None else int(bin_capacity)
    valid = jnp.ones(n, bool) if mask is None else jnp.asarray(mask, bool)
    segments = jnp.zeros(n, jnp.int32) if segment_ids is None else jnp.asarray(segment_ids, jnp.int32)
    return _cell_list_search(
        points, cell, valid, segments, cutoff=float(cutoff), max_neighbours=int(max_neighbours), pbc=pbc,
        search=search, capacity=capacity, chunk=chunk, max_edges=max_edges,
    )  # fmt: skip


# One compiled program: called outside ``jit``, the search ran op by op and compiled ~130
# primitives one by one (the module's doctest: 5.9 s, under 2 s compiled). The static arguments
# are what the shapes depend on.
@functools.partial(
    jax.jit, static_argnames=("cutoff", "max_neighbours", "pbc", "search", "capacity", "chunk", "max_edges")
)
def _cell_list_search(
    points, cell, valid, segments, *, cutoff, max_neighbours, pbc, search, capacity, chunk, max_edges
):
    n = points.shape[0]
    periodic = jnp.asarray(pbc)

    # Fractional coordinates; periodic axes wrapped into [0, 1) (``home``: the image each point
    # was moved by, folded back into the shifts at the end).
    lattice = jnp.eye(3, dtype=points.dtype) if cell is None else cell
    frac = jnp.matmul(points, jnp.linalg.inv(lattice), precision=jax.lax.Precision.HIGHEST)
    home = jnp.where(periodic, jnp.floor(frac), 0.0)
    frac = frac - home
    wrapped = points - _times_cell(home, lattice)
    heights = jnp.ones(3, points.dtype) if cell is None else cell_heights(lattice)
    # Bins per unit of fractional coordinate: an integer count along periodic axes (at least
    # one), exactly one cutoff wide along open ones.
    per_unit = jnp.where(periodic, jnp.maximum(jnp.floor(heights / cutoff), 1.0), heights / cutoff)
    bins = jnp.floor(frac * per_unit).astype(jnp.int32)
    counts_per_axis = per_unit.astype(jnp.int32)
    bins = jnp.where(periodic, jnp.clip(bins, 0, counts_per_axis - 1), bins)  # rounding at 1.0
    # a traced cell narrower than the cutoff on a periodic axis would need more images
    too_narrow = jnp.any(periodic & (heights / per_unit * jnp.asarray(search, points.dtype) < cutoff))

    table_size = 1 << max(4, (2 * n - 1).bit_length())
    keys = jnp.where(valid, _hash(bins, segments, table_size), table_size)  # padding: no bucket
    order = jnp.argsort(keys).astype(jnp.int32)
    counts = jnp.zeros(table_size + 1, jnp.int32).at[keys].add(1)[:table_size]
    starts = jnp.cumsum(counts) - counts
    # Per-point data in bucket order, so that a bucket's points are one contiguous block (read
    # with one slice per bin, not one gather per candidate); ``capacity`` rows of padding keep
    # every slice in bounds.
    pad = lambda x: jnp.concatenate([x[order], jnp.zeros((capacity,) + x.shape[1:], x.dtype)])
    sorted_float = pad(jnp.concatenate([wrapped, home], axis=1))  # [N + K, 6]
    sorted_int = pad(jnp.concatenate([bins, segments[:, None], jnp.arange(n, dtype=jnp.int32)[:, None]], axis=1))
    # Half shell: a pair is found from the bin whose offset to the other is lexicographically
    # positive (or from the same bin, lower index first): each pair once, no mirror to drop.
    half = [o for o in itertools.product(*(range(-s, s + 1) for s in search)) if o >= (0, 0, 0)]
    offsets = jnp.asarray(half, jnp.int32)  # [O, 3], offsets[0] == (0, 0, 0)
    same_bin = jnp.asarray([o == (0, 0, 0) for o in half])
    slots = jnp.arange(capacity, dtype=jnp.int32)
    lattice_shift = jnp.zeros((3, 3), points.dtype) if cell is None else lattice

    def one_point(i):
        target = bins[i] + offsets  # [O, 3] bins around point i, before wrapping
        image = jnp.where(periodic, jnp.floor_divide(target, jnp.maximum(counts_per_axis, 1)), 0)
        target = target - image * counts_per_axis
        bucket = _hash(target, jnp.broadcast_to(segments[i], target.shape[:1]), table_size)
        take = lambda data: jax.vmap(lambda start: jax.lax.dynamic_slice_in_dim(data, start, capacity))(starts[bucket])
        other_float, other_int = take(sorted_float), take(sorted_int)  # [O, K, 6], [O, K, 5]
        j = other_int[..., 4]
        candidate = (
            (slots[None, :] < counts[bucket][:, None])
            & jnp.all(other_int[..., :3] == target[:, None, :], axis=-1)  # its own bin, not a hash twin
            & (other_int[..., 3] == segments[i])
            & valid[i]
            & (~same_bin[:, None] | (j > i))
        )
        hidden = jnp.sum(jnp.maximum(counts[bucket] - capacity, 0))
        shift = image[:, None, :] - other_float[..., 3:].astype(jnp.int32) + home[i].astype(jnp.int32)
        vector = other_float[..., :3] + _times_cell(image.astype(points.dtype), lattice_shift)[:, None, :] - wrapped[i]
        distance = jnp.sqrt(jnp.sum(vector * vector, axis=-1))
        within = (candidate & (distance < cutoff)).reshape(-1)
        position = jnp.cumsum(within) - 1
        slot = jnp.where(within & (position < max_neighbours), position, max_neighbours)
        kept_j = jnp.zeros(max_neighbours + 1, jnp.int32).at[slot].set(j.reshape(-1))[:max_neighbours]
        kept_shift = jnp.zeros((max_neighbours + 1, 3), jnp.int32).at[slot].set(shift.reshape(-1, 3))
        closest = jnp.min(jnp.where(candidate, distance, jnp.inf))
        return kept_j, kept_shift[:max_neighbours], jnp.sum(within), hidden, closest

    kept_j, kept_shift, num_found, hidden, closest = jax.lax.map(
        one_point, jnp.arange(n, dtype=jnp.int32), batch_size=min(chunk, n)
    )
    budget_pairs = _budget_pairs(n, max_neighbours, max_edges)
    filled = jnp.arange(max_neighbours)[None, :] < num_found[:, None]  # [N, M], rows fill from the front
    # each pair counts for both ends (rows that lost pairs already overflow on their own)
    degree = num_found + jnp.zeros(n, jnp.int32).at[kept_j.reshape(-1)].add(filled.reshape(-1))
    (flat,) = jnp.nonzero(filled.reshape(-1), size=budget_pairs, fill_value=0)
    total_pairs = jnp.sum(jnp.minimum(num_found, max_neighbours))
    num_pairs = jnp.minimum(total_pairs, budget_pairs)
    real = jnp.arange(budget_pairs) < num_pairs
    i = (flat // max_neighbours).astype(jnp.int32)
    j = kept_j.reshape(-1)[flat]
    shift = jnp.where(real[:, None], kept_shift.reshape(-1, 3)[flat], 0)
    overflow = (
        jnp.sum(jnp.maximum(degree - max_neighbours, 0))
        + 2 * (total_pairs - num_pairs)
        + jnp.sum(hidden)
        + jnp.where(too_narrow, n * max_neighbours, 0)
    )
    return PointCloudGraph(
        senders=jnp.stack([i, j], axis=1).reshape(-1),
        receivers=jnp.stack([j, i], axis=1).reshape(-1),
        mask=jnp.repeat(real, 2),
        overflow=overflow.astype(jnp.int32),
        closest=jnp.min(closest),
        shifts=None if cell is None else jnp.stack([shift, -shift], axis=1).reshape(-1, 3),
    )


def host_radius_graph(
    points, cutoff: float, max_neighbours: int, cell=None, pbc=False, mask=None, segment_ids=None,
    max_edges: int | None = None,
) -> PointCloudGraph:  # fmt: skip
    """:func:`cell_list_radius_graph` on the host through ``vesin``: the same pairs, the same
    paired layout and budget (``max_edges`` as there), ``overflow`` and ``closest`` computed the
    same way.

    Concrete inputs give numpy arrays. Under ``jit`` (any input traced: points, cell, mask,
    segments) the same search runs as a host callback with the graph's fixed shapes: on a CPU
    the fastest way to build a graph inside ``jit`` at every size (``scripts/neighbour_lists.py``;
    on an accelerator the points would travel to the host and back, so use the cell list there:
    :func:`build_radius_graph`). The points are not differentiated through (indices only)."""
    pbc = normalise_pbc(pbc)
    if cell is None and any(pbc):
        raise ValueError("periodic boundary conditions need a cell ([3, 3], lattice vectors as rows)")
    if cell is not None and np.shape(cell) != (3, 3):
        raise ValueError(f"cell must be [3, 3] (lattice vectors as rows), got {tuple(np.shape(cell))}")
    if np.ndim(points) != 2 or np.shape(points)[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(np.shape(points))}")
    n = np.shape(points)[0]
    budget_pairs = _budget_pairs(n, max_neighbours, max_edges)
    search = functools.partial(
        _vesin_graph, cutoff=cutoff, max_neighbours=max_neighbours, budget_pairs=budget_pairs, pbc=pbc
    )
    return _graph_on_host(search, (points, cell, mask, segment_ids), 2 * budget_pairs, periodic=cell is not None)


def _graph_on_host(search, inputs, edges: int, periodic: bool = False) -> PointCloudGraph:
    """``search(*inputs)`` (numpy, returning a :class:`PointCloudGraph`'s fields) on concrete
    inputs, or, if any input is traced, as a host callback with the graph's fixed shapes
    (``edges`` edges; shifts if ``periodic``); the inputs are not differentiated through."""
    if not any(isinstance(x, jax.core.Tracer) for x in inputs):
        return PointCloudGraph(*search(*(None if x is None else np.asarray(x) for x in inputs)))
    points_dtype = jnp.asarray(inputs[0]).dtype
    dtype = points_dtype if jnp.issubdtype(points_dtype, jnp.floating) else jnp.float32
    shapes = [
        jax.ShapeDtypeStruct((edges,), jnp.int32),
        jax.ShapeDtypeStruct((edges,), jnp.int32),
        jax.ShapeDtypeStruct((edges,), jnp.bool_),
        jax.ShapeDtypeStruct((), jnp.int32),
        jax.ShapeDtypeStruct((), dtype),
    ] + ([jax.ShapeDtypeStruct((edges, 3), jnp.int32)] if periodic else [])

    def on_host(*arrays):
        graph = search(*(None if x is None else np.asarray(x) for x in arrays))
        return tuple(np.asarray(x, s.dtype) for x, s in zip(graph, shapes))

    operands = [None if x is None else jax.lax.stop_gradient(jnp.asarray(x)) for x in inputs]
    return PointCloudGraph(*jax.pure_callback(on_host, shapes, *operands, vmap_method="sequential"))


def _vesin_graph(points, cell, mask, segment_ids, *, cutoff, max_neighbours, budget_pairs, pbc):
    """The fields of a :class:`PointCloudGraph` (numpy) from one ``vesin`` half list."""
    points = np.asarray(points, np.float64)
    n = len(points)
    box = np.zeros((3, 3)) if cell is None else np.asarray(cell, np.float64)
    if cell is not None and abs(np.linalg.det(box)) < 1e-9:
        raise ValueError(f"the cell is singular (volume {np.linalg.det(box):.3g}): {box.tolist()}")
    real_points = np.arange(n) if mask is None else np.flatnonzero(np.asarray(mask, bool))
    i, j, shift, distance = vesin.NeighborList(cutoff=cutoff, full_list=False).compute(
        points[real_points], box, list(pbc), quantities="ijSd"
    )
    i, j = (i.astype(np.int32), j.astype(np.int32)) if mask is None else (real_points[i], real_points[j])
    i, j, shift = i.astype(np.int32, copy=False), j.astype(np.int32, copy=False), shift.astype(np.int32)
    if segment_ids is not None:  # several systems in one padded array: no edges between them
        segments = np.asarray(segment_ids)
        same = segments[i] == segments[j]
        i, j, shift, distance = i[same], j[same], shift[same], distance[same]
    # vesin's half list holds each pair once in either direction: orient as the cell list does
    # (lower index first; a point's own image with its first nonzero shift positive)
    flip = i > j
    own = np.flatnonzero(i == j)
    flip[own] = ~_lexicographically_positive(shift[own])
    flip = np.flatnonzero(flip)  # (vesin orients most pairs so already: swap only the others)
    i[flip], j[flip], shift[flip] = j[flip], i[flip], -shift[flip]
    degree = np.bincount(i, minlength=n) + np.bincount(j, minlength=n)
    num_pairs = min(len(i), budget_pairs)
    senders, receivers = np.zeros(2 * budget_pairs, np.int32), np.zeros(2 * budget_pairs, np.int32)
    senders[0 : 2 * num_pairs : 2] = receivers[1 : 2 * num_pairs : 2] = i[:num_pairs]
    receivers[0 : 2 * num_pairs : 2] = senders[1 : 2 * num_pairs : 2] = j[:num_pairs]
    edge_mask = np.zeros(2 * budget_pairs, bool)
    edge_mask[: 2 * num_pairs] = True
    overflow = np.int32(np.maximum(degree - max_neighbours, 0).sum() + 2 * (len(i) - num_pairs))
    closest = np.float64(distance.min()) if len(distance) else np.float64(np.inf)
    if cell is None:
        return senders, receivers, edge_mask, overflow, closest
    shifts = np.zeros((2 * budget_pairs, 3), np.int32)
    shifts[0 : 2 * num_pairs : 2] = shift[:num_pairs]
    shifts[1 : 2 * num_pairs : 2] = -shift[:num_pairs]
    return senders, receivers, edge_mask, overflow, closest, shifts


BUILDERS = ("auto", "host", "device")


def resolve_builder(builder: str = "auto") -> str:
    """Where a graph is built: ``host`` (vesin radius graphs, a k-d tree for k-NN; inside
    ``jit`` as host callbacks) or ``device`` (the cell list; all pairs for k-NN). ``auto``: the
    host on a CPU, where it is the fastest (``scripts/neighbour_lists.py``), the device on an
    accelerator (the points never travel)."""
    if builder not in BUILDERS:
        raise ValueError(f"builder must be one of {BUILDERS}, got {builder!r}")
    if builder == "auto":
        return "host" if jax.default_backend() == "cpu" else "device"
    return builder


def build_radius_graph(
    points, cutoff: float, max_neighbours: int, cell=None, pbc=False, mask=None, segment_ids=None,
    bin_capacity: int | None = None, builder: str = "auto", max_edges: int | None = None,
) -> PointCloudGraph:  # fmt: skip
    """A radius graph, inside ``jit`` or not, built where :func:`resolve_builder` says:
    :func:`host_radius_graph` on a CPU (vesin; 10^5 points at water density: 0.54 s inside
    ``jit`` against 2.9 s for the cell list, 2-core CPU), :func:`cell_list_radius_graph` on an
    accelerator. ``bin_capacity`` is the cell list's."""
    if resolve_builder(builder) == "host":
        return host_radius_graph(points, cutoff, max_neighbours, cell, pbc, mask, segment_ids, max_edges)
    return cell_list_radius_graph(
        points, cutoff, max_neighbours, cell, pbc, mask, segment_ids, bin_capacity, max_edges=max_edges
    )


def build_knn_graph(points, k: int, mask=None, segment_ids=None, builder: str = "auto") -> PointCloudGraph:
    """The k-nearest-neighbour graph of :func:`se3jax.point_clouds.knn_graph` (the same layout),
    built where :func:`resolve_builder` says: on the host a k-d tree (``scipy``, ``O(N log N)``,
    inside ``jit`` as a host callback), on the device all pairs (``O(N^2)``)."""
    if resolve_builder(builder) == "device":
        return knn_graph(points, k, mask, segment_ids)
    n = np.shape(points)[0]
    if np.ndim(points) != 2 or np.shape(points)[1] != 3:
        raise ValueError(f"points must be [N, 3], got {tuple(np.shape(points))}")
    if not 0 < k < n:
        raise ValueError(f"k must be in [1, {n - 1}] for {n} points, got {k}")
    return _graph_on_host(functools.partial(_knn_on_host, k=k), (points, mask, segment_ids), n * k)


def _knn_on_host(points, mask, segment_ids, *, k):
    """The fields of :func:`build_knn_graph`'s graph (numpy), one k-d tree per segment."""
    points = np.asarray(points, np.float64)
    n = len(points)
    valid = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    segments = np.zeros(n, np.int64) if segment_ids is None else np.asarray(segment_ids)
    senders, real = np.zeros((n, k), np.int32), np.zeros((n, k), bool)
    closest = np.inf
    for segment in np.unique(segments[valid]):
        members = np.flatnonzero(valid & (segments == segment))
        found = min(k, len(members) - 1)
        if found < 1:
            continue
        distance, nearest = scipy.spatial.cKDTree(points[members]).query(points[members], k=found + 1)
        # drop each point itself (not necessarily first among coincident points; else the farthest)
        itself = nearest == np.arange(len(members))[:, None]
        itself[~itself.any(axis=1), -1] = True
        keep = np.argsort(itself, axis=1, kind="stable")[:, :found]
        nearest, distance = np.take_along_axis(nearest, keep, 1), np.take_along_axis(distance, keep, 1)
        senders[members, :found], real[members, :found] = members[nearest], True
        closest = min(closest, float(distance.min()))
    receivers = np.repeat(np.arange(n, dtype=np.int32), k)
    return senders.reshape(-1), receivers, real.reshape(-1), np.int32(0), np.float64(closest)


def _budget_pairs(num_points: int, max_neighbours: int, max_edges: int | None) -> int:
    """Pairs in the output: ``max_edges // 2``, or room for every point's maximum."""
    if max_edges is None:
        return num_points * max_neighbours // 2
    if max_edges < 2:
        raise ValueError(f"max_edges must be at least 2 (one pair), got {max_edges}")
    return max_edges // 2


def _lexicographically_positive(shift: np.ndarray) -> np.ndarray:
    first = np.argmax(shift != 0, axis=1)
    return shift[np.arange(len(shift)), first] > 0
