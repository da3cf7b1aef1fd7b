"""Graphs from point clouds: the same edges as a brute-force numpy search, fixed shapes under
jit, clear errors for an overflowing budget and for coincident points."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax.point_clouds import check_graph, knn_graph, radius_graph


def brute_force_pairs(points, cutoff, mask, segments):
    p = np.asarray(points, np.float64)
    pairs = set()
    for i in range(len(p)):
        for j in range(i + 1, len(p)):
            if mask[i] and mask[j] and segments[i] == segments[j] and np.linalg.norm(p[i] - p[j]) < cutoff:
                pairs.add((i, j))
    return pairs


def test_radius_graph_finds_exactly_the_close_pairs_paired_and_per_segment():
    rng = np.random.default_rng(0)
    points = rng.uniform(0, 4, size=(40, 3)).astype(np.float32)
    mask = np.arange(40) < 35  # 5 padding points
    segments = np.repeat([0, 1], 20)  # two graphs in one batch
    g = jax.jit(lambda p: radius_graph(p, 1.5, 39, mask=mask, segment_ids=segments))(points)
    s, r, m = (np.asarray(x) for x in (g.senders, g.receivers, g.mask))
    assert s.shape == (40 * 39,) and int(g.overflow) == 0
    assert np.array_equal(s[m][0::2], r[m][1::2]) and np.array_equal(r[m][0::2], s[m][1::2])  # paired
    found = {(min(a, b), max(a, b)) for a, b in zip(s[m], r[m])}
    assert found == brute_force_pairs(points, 1.5, mask, segments) and len(found) > 10
    assert not m[np.flatnonzero(~m)].any() and m[: 2 * len(found)].all()  # real edges first
    check_graph(g, points, mask)


def test_knn_graph_finds_the_nearest_points():
    rng = np.random.default_rng(1)
    points = rng.normal(size=(30, 3)).astype(np.float32)
    g = knn_graph(points, k=4)
    d = np.linalg.norm(points[:, None] - points[None], axis=-1) + np.eye(30) * 1e9
    for p in range(30):
        expected = set(np.argsort(d[p])[:4].tolist())
        assert set(np.asarray(g.senders)[g.receivers == p].tolist()) == expected
    assert bool(g.mask.all())
    few = knn_graph(points, k=4, mask=np.arange(30) < 3)  # 3 real points: 2 neighbours each
    assert int(few.mask.sum()) == 6
    with pytest.raises(ValueError, match="k must be"):
        knn_graph(points, k=30)


def test_overflowing_budget_is_an_error_never_a_silent_truncation():
    points = np.random.default_rng(2).uniform(0, 1, size=(20, 3)).astype(np.float32)  # dense
    g = radius_graph(points, cutoff=2.0, max_neighbours=4)
    assert int(g.overflow) > 0
    with pytest.raises(ValueError, match="overflowed by .* edges: raise max_neighbours"):
        check_graph(g)


def test_coincident_points_are_named():
    points = np.random.default_rng(3).normal(size=(6, 3)).astype(np.float32) * 3
    points[4] = points[1] + 1e-5
    g = radius_graph(points, cutoff=10.0, max_neighbours=5)
    with pytest.raises(ValueError, match="points 1 and 4 are"):
        check_graph(g, points)
    assert float(g.closest) < 1e-3 and bool(jnp.isfinite(g.closest))
