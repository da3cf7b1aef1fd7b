"""Padded batches: budgets, packing, per-epoch shuffling, resuming, devices, the thread."""

import gc
import threading
import time

import jax
import numpy as np
import pytest

from se3jax.data.loader import BackgroundIterator, BatchLoader, budget_for, pack_batches
from se3jax.data.qm9 import load_qm9
from se3jax.graphs import PaddingBudget, pad_to_budget, padding_masks

BATCH = 32


@pytest.fixture(scope="module")
def dataset(qm9_1000_cache):
    return load_qm9(qm9_1000_cache, max_molecules=1000, num_workers=1)


@pytest.fixture(scope="module")
def train(dataset):
    return dataset.splits["train"]


@pytest.fixture(scope="module")
def budget(dataset, train):
    return budget_for(dataset, train, BATCH)


def real_counts(batch):
    """(real nodes, real edges, real graphs) of a padded batch."""
    nodes, edges, graphs = padding_masks(batch)
    return int(np.sum(nodes)), int(np.sum(edges)), int(np.sum(graphs))


def test_padding_masks_on_the_host_equal_the_jitted_ones(dataset, train):
    """The host's masks (numpy, for the value checks of every batch: nothing to compile) are
    the masks the compiled steps compute, also with several trailing padding graphs."""
    rng = np.random.default_rng(0)
    for n, extra_graphs in ((1, 0), (5, 3), (17, 1)):
        graphs = dataset.batch_graphs(rng.choice(train, n, replace=False))
        nodes, edges = int(np.sum(graphs.n_node)), int(np.sum(graphs.n_edge))
        padded = pad_to_budget(graphs, PaddingBudget(n_node=nodes + 7, n_edge=edges + 10, n_graph=n + 1 + extra_graphs))
        host = padding_masks(padded)
        assert isinstance(host.nodes, np.ndarray) and real_counts(padded) == (nodes, edges, n)
        for a, b in zip(host, jax.jit(padding_masks)(padded)):
            np.testing.assert_array_equal(a, b)


def assert_same_batches(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for leaf_x, leaf_y in zip(jax.tree_util.tree_leaves(x), jax.tree_util.tree_leaves(y)):
            np.testing.assert_array_equal(leaf_x, leaf_y)


@pytest.mark.parametrize(
    "sizes,slack,expected",
    [
        # 32 x 18 x 1.1 = 633.6 nodes (+1 padding node) -> 640; 32 x 37.5 x 1.1 = 1320 (+1) -> 1344
        (dict(batch_size=32, mean_nodes=18.0, mean_edges=37.5, max_nodes=29, max_edges=56), 1.1, (640, 1344, 33)),
        # the slack counts: 10 x 6 x 1.1 = 66 (+1) -> 128, without it 61 -> 64
        (dict(batch_size=10, mean_nodes=6.0, mean_edges=6.0, max_nodes=9, max_edges=16), 1.1, (128, 128, 11)),
        (dict(batch_size=10, mean_nodes=6.0, mean_edges=6.0, max_nodes=9, max_edges=16), 1.0, (64, 64, 11)),
        # exactly a multiple of 64 stays: 4 x 15.75 = 63 (+1) = 64; one node more needs 128
        (dict(batch_size=4, mean_nodes=15.75, mean_edges=31.75, max_nodes=20, max_edges=40), 1.0, (64, 128, 5)),
        (dict(batch_size=4, mean_nodes=16.0, mean_edges=15.75, max_nodes=20, max_edges=40), 1.0, (128, 64, 5)),
        # one molecule per batch: the largest molecule sets the budget, 29 (+1) -> 64, 70 (+1) -> 128
        (dict(batch_size=1, mean_nodes=10.0, mean_edges=20.0, max_nodes=29, max_edges=70), 1.1, (64, 128, 2)),
    ],
)
def test_budget_for_a_batch_rounds_up_with_slack_and_room_for_the_largest(sizes, slack, expected):
    budget = PaddingBudget.for_batch(**sizes, slack=slack)
    assert (budget.n_node, budget.n_edge, budget.n_graph) == expected


def test_budget_comes_from_the_molecule_sizes(dataset, train, budget):
    """The loader's budget holds BATCH molecules of the mean size (+10%) and the largest one."""
    nodes, edges = dataset.num_nodes[train], dataset.num_edges[train]
    assert budget.n_graph == BATCH + 1 and budget.n_node % 64 == 0 and budget.n_edge % 64 == 0
    assert BATCH * nodes.mean() * 1.1 < budget.n_node <= BATCH * nodes.mean() * 1.1 + 65
    assert BATCH * edges.mean() * 1.1 < budget.n_edge <= BATCH * edges.mean() * 1.1 + 65
    assert budget.fits(nodes.max(), edges.max(), 1)


def test_every_molecule_once_per_epoch_and_no_batch_exceeds_the_budget(dataset, train, budget):
    loader = BatchLoader(dataset, train, BATCH, budget, shuffle=True, seed=0)
    batches = list(loader.epoch_batches(0))
    assert len(batches) == loader.num_batches(0)
    plan = [step[0] for step in loader.plan(0)]
    np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.sort(train))
    for batch, indices in zip(batches, plan):
        assert batch.nodes["positions"].shape == (budget.n_node, 3)
        assert batch.nodes["features"].shape == (budget.n_node, 6)
        assert batch.edges["features"].shape == (budget.n_edge, 4)
        assert batch.n_node.shape == batch.globals["target"].shape == (budget.n_graph,)
        assert batch.nodes["positions"].dtype == batch.globals["target"].dtype == np.float32
        assert batch.senders.dtype == batch.receivers.dtype == batch.n_node.dtype == np.int32
        n_nodes, n_edges, n_graphs = real_counts(batch)
        assert budget.fits(n_nodes, n_edges, n_graphs) and n_graphs == len(indices) <= BATCH
        np.testing.assert_array_equal(batch.n_node[:n_graphs], dataset.num_nodes[indices])
        np.testing.assert_array_equal(
            batch.globals["target"][:n_graphs], dataset.batch_graphs(indices).globals["target"]
        )
        np.testing.assert_array_equal(batch.globals["target"][n_graphs:], 0.0)


def test_a_tight_budget_closes_batches_early_without_losing_molecules(dataset, train):
    tight = PaddingBudget(n_node=128, n_edge=256, n_graph=BATCH + 1)
    loader = BatchLoader(dataset, train, BATCH, tight, seed=3)
    plan = [step[0] for step in loader.plan(0)]
    np.testing.assert_array_equal(np.sort(np.concatenate(plan)), np.sort(train))
    assert max(len(p) for p in plan) < BATCH  # the budget, not batch_size, closed them
    for batch in loader.epoch_batches(0):
        assert tight.fits(*real_counts(batch))


def test_shuffling_is_per_epoch_and_deterministic(dataset, train, budget):
    loader = BatchLoader(dataset, train, BATCH, budget, shuffle=True, seed=7)
    assert not np.array_equal(loader.order(0), loader.order(1))
    same = BatchLoader(dataset, train, BATCH, budget, shuffle=True, seed=7)
    np.testing.assert_array_equal(loader.order(1), same.order(1))
    assert_same_batches(list(loader.epoch_batches(1)), list(same.epoch_batches(1)))
    other_seed = BatchLoader(dataset, train, BATCH, budget, shuffle=True, seed=8)
    assert not np.array_equal(loader.order(1), other_seed.order(1))
    unshuffled = BatchLoader(dataset, train, BATCH, budget, shuffle=False)
    np.testing.assert_array_equal(unshuffled.order(5), train)


def test_resuming_at_a_batch_gives_the_tail_of_the_epoch(dataset, train, budget):
    loader = BatchLoader(dataset, train, BATCH, budget, seed=1)
    full = list(loader.epoch_batches(2))
    k = 5
    assert_same_batches(list(loader.epoch_batches(2, start_batch=k)), full[k:])
    assert list(loader.epoch_batches(2, start_batch=len(full))) == []
    with pytest.raises(ValueError, match="start_batch"):
        loader.epoch_batches(2, start_batch=len(full) + 1)


def test_devices_get_a_leading_axis_and_the_last_group_is_padded(dataset, train):
    # a roomy budget so that exactly 5 batches of BATCH form: 3 groups of 2, the last half padding
    roomy = PaddingBudget(n_node=29 * BATCH + 64, n_edge=56 * BATCH + 64, n_graph=BATCH + 1)
    indices = train[: 5 * BATCH]
    loader = BatchLoader(dataset, indices, BATCH, roomy, seed=0, num_devices=2)
    groups = list(loader.epoch_batches(0))
    assert len(groups) == loader.num_batches(0) == 3
    for group in groups:
        assert group.nodes["positions"].shape == (2, roomy.n_node, 3)
        assert group.n_node.shape == (2, roomy.n_graph)
        assert group.senders.dtype == np.int32
    per_device = [jax.tree_util.tree_map(lambda x, d=d: x[d], g) for g in groups for d in range(2)]
    counts = [real_counts(b) for b in per_device]
    assert sum(c[2] for c in counts) == len(indices)
    assert counts[-1] == (0, 0, 0)  # all padding
    np.testing.assert_array_equal(per_device[-1].globals["target"], 0.0)


def test_pack_batches_rejects_a_molecule_larger_than_the_budget():
    with pytest.raises(ValueError, match="molecule 1 .* does not fit"):
        pack_batches([3, 40], [4, 80], [0, 1], 4, PaddingBudget(n_node=16, n_edge=16, n_graph=3))


class ExplodingDataset:
    """Raises while assembling the third batch."""

    def __init__(self, dataset):
        self.inner, self.calls = dataset, 0
        self.num_nodes, self.num_edges = dataset.num_nodes, dataset.num_edges

    def batch_graphs(self, indices):
        self.calls += 1
        if self.calls == 3:
            raise RuntimeError("disk on fire")
        return self.inner.batch_graphs(indices)


def test_errors_in_the_background_thread_reach_the_consumer(dataset, train, budget):
    loader = BatchLoader(ExplodingDataset(dataset), train, BATCH, budget)
    batches = loader.epoch_batches(0)
    next(batches), next(batches)
    with pytest.raises(RuntimeError, match="disk on fire"):
        next(batches)
    with pytest.raises(StopIteration):
        next(batches)


def test_an_abandoned_iterator_stops_its_thread():
    def endless():
        while True:
            yield np.zeros(3)

    def loader_threads():
        return [t for t in threading.enumerate() if t.name == "se3jax-batch-loader"]

    before = len(loader_threads())
    closed = BackgroundIterator(endless(), size=2)
    next(closed)
    closed.close()
    abandoned = BackgroundIterator(endless(), size=2)
    next(abandoned)
    del abandoned
    gc.collect()
    deadline = time.monotonic() + 5
    while len(loader_threads()) > before and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(loader_threads()) == before


def test_processes_share_an_epoch_with_equal_step_counts(dataset, train, budget):
    """Multi-host: each process gets its own device groups, all the same count, together
    covering every molecule exactly once."""
    loaders = [
        BatchLoader(dataset, train, BATCH, budget, seed=3, num_devices=2, process_index=p, process_count=3)
        for p in range(3)
    ]
    counts = {loader.num_batches(0) for loader in loaders}
    assert len(counts) == 1
    seen = np.concatenate([idx for loader in loaders for group in loader.plan(0) for idx in group])
    np.testing.assert_array_equal(np.sort(seen), np.sort(train))
    with pytest.raises(ValueError, match="process_index"):
        BatchLoader(dataset, train, BATCH, budget, process_index=3, process_count=3)


def test_batches_are_checked_on_the_host_before_a_compiled_step(dataset, train, budget):
    """Inside jit a NaN position cannot raise: the loader checks every batch's values first."""
    import dataclasses

    broken = dataclasses.replace(dataset)  # a shallow copy: its own positions array
    broken.positions = dataset.positions.copy()
    victim = int(train[3])
    broken.positions[broken.atom_offsets[victim] + 1] = np.nan
    loader = BatchLoader(broken, train, BATCH, budget, shuffle=False)
    with pytest.raises(ValueError, match="NaN or infinite"):
        list(loader.epoch_batches(0))
