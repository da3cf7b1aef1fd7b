"""Cell lists and the host (vesin) path find exactly the pairs of a brute-force search over
explicit periodic images, in the paired layout, for open, periodic, partly periodic, skewed
and narrower-than-the-cutoff cells; overflows are reported, never silent."""

import itertools

import jax
import numpy as np
import pytest

from se3jax.neighbours import build_knn_graph, build_radius_graph, cell_list_radius_graph, host_radius_graph
from se3jax.point_clouds import check_graph, knn_graph, radius_graph


def brute_force_edges(points, cutoff, cell=None, pbc=(False, False, False), mask=None, segments=None):
    """Directed edges ``(sender, receiver, shift)`` with ``|x_r - x_s + shift @ cell| < cutoff``,
    over every image that can be that close (numpy, float64)."""
    p = np.asarray(points, np.float64)
    n = len(p)
    real = np.ones(n, bool) if mask is None else np.asarray(mask, bool)
    segments = np.zeros(n, int) if segments is None else np.asarray(segments)
    if cell is None:
        images, cell = [(0, 0, 0)], np.eye(3)
    else:
        cell = np.asarray(cell, np.float64)
        volume = abs(np.linalg.det(cell))
        heights = [volume / np.linalg.norm(np.cross(cell[(a + 1) % 3], cell[(a + 2) % 3])) for a in range(3)]
        extent = np.max(np.abs(p)) * 2
        reach = [int(np.ceil((cutoff + extent) / h)) + 1 if periodic else 0 for h, periodic in zip(heights, pbc)]
        images = list(itertools.product(*(range(-r, r + 1) for r in reach)))
    edges = set()
    for shift in images:
        offset = np.asarray(shift, np.float64) @ cell
        d = np.linalg.norm(p[None, :] + offset - p[:, None], axis=-1)  # [sender, receiver]
        for s, r in zip(*np.nonzero(d < cutoff)):
            if real[s] and real[r] and segments[s] == segments[r] and (s != r or any(shift)):
                edges.add((int(s), int(r), tuple(int(v) for v in shift)))
    return edges


def graph_edges(graph):
    s, r, m = (np.asarray(x) for x in (graph.senders, graph.receivers, graph.mask))
    shifts = np.zeros((len(s), 3), int) if graph.shifts is None else np.asarray(graph.shifts)
    # paired layout: edge 2k+1 is edge 2k reversed, with the opposite image
    assert np.array_equal(s[0::2], r[1::2]) and np.array_equal(r[0::2], s[1::2])
    assert np.array_equal(shifts[0::2], -shifts[1::2]) and np.array_equal(m[0::2], m[1::2])
    assert m[: m.sum()].all(), "real edges come first"
    edges = [(int(a), int(b), tuple(int(v) for v in c)) for a, b, c in zip(s[m], r[m], shifts[m])]
    assert len(edges) == len(set(edges)), "duplicate edges"
    return set(edges)


def skewed(rng, lengths):
    cell = np.diag(lengths).astype(np.float64)
    cell[1, 0], cell[2, 0], cell[2, 1] = rng.uniform(-0.45, 0.45, 3) * np.asarray(lengths)[[0, 0, 1]]
    return cell


CASES = {  # name: (cell factory, pbc, cutoff)
    "periodic_cube": (lambda rng: np.eye(3) * 6.0, True, 1.5),
    "skewed_periodic": (lambda rng: skewed(rng, [6.0, 5.0, 7.0]), True, 1.7),
    "slab_partly_periodic": (lambda rng: skewed(rng, [5.0, 6.0, 8.0]), (True, True, False), 1.6),
    "narrower_than_cutoff": (lambda rng: skewed(rng, [2.0, 3.5, 1.2]), True, 2.5),  # many images
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_cell_list_matches_brute_force_over_images(name):
    rng = np.random.default_rng(sorted(CASES).index(name))
    make_cell, pbc, cutoff = CASES[name]
    cell = make_cell(rng)
    frac = rng.uniform(-0.3, 1.3, size=(36, 3))  # points outside the cell too: wrapping is internal
    points = (frac @ cell).astype(np.float32)
    mask = np.arange(36) < 33
    expected = brute_force_edges(points, cutoff, cell, np.broadcast_to(pbc, 3), mask)
    max_neighbours = 2 * max(np.bincount([s for s, _, _ in expected], minlength=36)) + 2
    build = jax.jit(lambda p: cell_list_radius_graph(p, cutoff, max_neighbours, cell=cell, pbc=pbc, mask=mask))
    graph = build(points)
    assert int(graph.overflow) == 0 and len(expected) > 40
    assert graph_edges(graph) == expected
    check_graph(graph)
    host = host_radius_graph(points, cutoff, max_neighbours, cell=cell, pbc=pbc, mask=mask)
    assert graph_edges(host) == expected and int(host.overflow) == 0


def compiled(builder, *args, **kwargs):
    """``builder(*args, **kwargs)`` as one compiled program (op by op, every primitive compiles
    on its own); the arguments are its constants, so a cell stays concrete."""
    return jax.jit(lambda: builder(*args, **kwargs))()


def test_open_cell_list_equals_the_all_pairs_builder_per_segment():
    rng = np.random.default_rng(7)
    points = (rng.normal(size=(50, 3)) * [6.0, 1.2, 1.2]).astype(np.float32)  # long, thin, unbounded
    mask, segments = np.arange(50) < 46, np.repeat([0, 1], 25)
    dense = compiled(radius_graph, points, 1.8, 49, mask=mask, segment_ids=segments)
    cells = compiled(cell_list_radius_graph, points, 1.8, 49, mask=mask, segment_ids=segments, bin_capacity=12)
    assert cells.shifts is None and int(cells.overflow) == 0 == int(dense.overflow)
    assert graph_edges(cells) == graph_edges(dense) == brute_force_edges(points, 1.8, mask=mask, segments=segments)
    assert len(graph_edges(cells)) > 20
    assert np.isclose(float(cells.closest), float(dense.closest), rtol=1e-6)


def test_overflow_is_reported_for_small_budgets_and_full_bins():
    rng = np.random.default_rng(3)
    cell = np.eye(3) * 4.0
    points = rng.uniform(0, 4, size=(60, 3)).astype(np.float32)
    fits = compiled(cell_list_radius_graph, points, 1.5, 40, cell=cell, pbc=True, bin_capacity=60)
    assert int(fits.overflow) == 0
    few_neighbours = compiled(cell_list_radius_graph, points, 1.5, 4, cell=cell, pbc=True, bin_capacity=60)
    assert int(few_neighbours.overflow) > 0
    small_bins = compiled(cell_list_radius_graph, points, 1.5, 40, cell=cell, pbc=True, bin_capacity=2)
    assert int(small_bins.overflow) > 0
    with pytest.raises(ValueError, match="overflowed by .* edges"):
        check_graph(small_bins)
    # a traced cell narrower than the cutoff cannot get its images: reported, not missed
    narrow = jax.jit(lambda c: cell_list_radius_graph(points, 1.5, 40, cell=c, pbc=True, bin_capacity=60))
    assert int(narrow(np.eye(3) * 1.2).overflow) > 0 and int(narrow(cell).overflow) == 0


def test_bad_inputs_are_clear_errors():
    points = np.zeros((4, 3), np.float32) + np.arange(4)[:, None]
    with pytest.raises(ValueError, match="need a cell"):
        cell_list_radius_graph(points, 1.0, 4, pbc=True)
    with pytest.raises(ValueError, match="cell must be"):
        cell_list_radius_graph(points, 1.0, 4, cell=np.eye(2), pbc=True)
    with pytest.raises(ValueError, match="singular"):
        cell_list_radius_graph(points, 1.0, 4, cell=np.diag([1.0, 1.0, 0.0]), pbc=True)


def test_host_builder_inside_jit_finds_the_cell_lists_pairs():
    """vesin through a host callback under jit (traced points, cell, mask and segments: what
    build_radius_graph runs on a CPU) finds the cell list's pairs, with the fixed shapes."""
    rng = np.random.default_rng(11)
    cell = skewed(rng, [6.0, 5.0, 7.0])
    points = (rng.uniform(-0.2, 1.2, size=(40, 3)) @ cell).astype(np.float32)
    mask, segments = np.arange(40) < 37, np.repeat([0, 1], 20)
    both = dict(pbc=True, mask=mask, segment_ids=segments)
    host = jax.jit(lambda p, c, m, s: host_radius_graph(p, 1.7, 30, cell=c, pbc=True, mask=m, segment_ids=s))
    graph = host(points, cell, mask, segments)
    cells = compiled(cell_list_radius_graph, points, 1.7, 30, cell=cell, **both)
    assert graph.senders.shape == cells.senders.shape == (40 * 30,) and graph.shifts.shape == (40 * 30, 3)
    assert int(graph.overflow) == 0 == int(cells.overflow)
    assert graph_edges(graph) == graph_edges(cells) == brute_force_edges(points, 1.7, cell, (True,) * 3, mask, segments)
    assert np.isclose(float(graph.closest), float(cells.closest), rtol=1e-6)
    assert int(host(points, cell, mask, np.zeros(40, int)).mask.sum()) > int(graph.mask.sum())  # segments apart
    assert int(jax.jit(lambda p: host_radius_graph(p, 1.7, 3, cell=cell, pbc=True))(points).overflow) > 0
    with pytest.raises(ValueError, match="builder must be one of"):
        build_radius_graph(points, 1.7, 30, builder="vesin")


def test_a_total_edge_budget_pads_to_it_and_reports_what_did_not_fit():
    """``max_edges``: the output holds that many edges (not N * max_neighbours), pairs beyond it
    are counted in the overflow, in both builders."""
    rng = np.random.default_rng(5)
    cell = np.eye(3) * 5.0
    points = rng.uniform(0, 5, size=(30, 3)).astype(np.float32)
    expected = brute_force_edges(points, 1.5, cell, (True,) * 3)
    exact, short = len(expected), len(expected) - 6
    for build in (
        lambda **k: compiled(cell_list_radius_graph, points, 1.5, 30, cell=cell, pbc=True, **k),
        lambda **k: host_radius_graph(points, 1.5, 30, cell=cell, pbc=True, **k),
    ):
        fits = build(max_edges=exact)
        assert fits.senders.shape == (exact,) and int(fits.overflow) == 0 and graph_edges(fits) == expected
        cut = build(max_edges=short)
        assert cut.senders.shape == (short,) and int(cut.overflow) == 6 and graph_edges(cut) < expected
    with pytest.raises(ValueError, match="max_edges must be at least 2"):
        host_radius_graph(points, 1.5, 30, cell=cell, pbc=True, max_edges=1)


def test_host_knn_graph_is_the_all_pairs_knn_graph():
    """The k-d tree on the host (concrete, and inside jit with a traced mask and segments) gives
    knn_graph's graph exactly: the same senders in the same rows (nearest first), the same mask
    (a segment with fewer than k other points gets only those) and closest distance; a point
    coincident with another is never its own neighbour."""
    rng = np.random.default_rng(2)
    points = rng.normal(size=(40, 3)).astype(np.float32) * 2
    mask = np.arange(40) < 38
    segments = np.repeat([0, 1, 2], [20, 15, 5])  # segment 2: 3 real points, fewer than k others
    expected = compiled(knn_graph, points, 6, mask=mask, segment_ids=segments)
    host = build_knn_graph(points, 6, mask=mask, segment_ids=segments, builder="host")
    traced = jax.jit(lambda p, m, s: build_knn_graph(p, 6, mask=m, segment_ids=s, builder="host"))
    for graph in (host, traced(points, mask, segments)):
        m = np.asarray(expected.mask)
        assert np.array_equal(np.asarray(graph.mask), m) and 0 < m.sum() < m.size
        assert np.array_equal(np.asarray(graph.senders)[m], np.asarray(expected.senders)[m])
        assert np.array_equal(np.asarray(graph.receivers), np.asarray(expected.receivers))
        assert np.isclose(float(graph.closest), float(expected.closest), rtol=1e-6)
    twins = np.concatenate([points[:10], points[:1]])  # point 10 sits on point 0
    g = build_knn_graph(twins, 3, builder="host")
    senders = np.asarray(g.senders).reshape(11, 3)
    assert all(p not in senders[p] for p in range(11)) and 10 in senders[0] and float(g.closest) == 0.0
