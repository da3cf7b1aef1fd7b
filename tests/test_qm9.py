"""QM9 from qm9pack's CSVs: units, splits, train-only normalisation, the on-disk cache."""

import json
import logging

import jax
import jraph
import numpy as np
import pytest

from se3jax.data import qm9_cache, qm9_source
from se3jax.data.loader import precompute_edge_harmonics
from se3jax.data.molecules import BOND_TYPES, node_features
from se3jax.data.qm9 import (
    HARTREE_TO_EV,
    TARGETS,
    Normalisation,
    QM9Dataset,
    load_qm9,
    split_indices,
    split_sizes,
)

SUBSET = 1000


@pytest.fixture(scope="module")
def cache_dir(qm9_1000_cache):
    return qm9_1000_cache  # processed in worker processes (conftest)


@pytest.fixture(scope="module")
def dataset(cache_dir):
    return load_qm9(cache_dir, task="homo", max_molecules=SUBSET)


def test_targets_are_the_twelve_standard_ones_in_order():
    assert list(TARGETS) == ["mu", "alpha", "homo", "lumo", "gap", "r2", "zpve", "U0", "U", "H", "G", "Cv"]
    assert {name: unit for name, (_, _, unit) in TARGETS.items()} == {
        "mu": "D",
        "alpha": "bohr^3",
        "homo": "eV",
        "lumo": "eV",
        "gap": "eV",
        "r2": "bohr^2",
        "zpve": "eV",
        "U0": "eV",
        "U": "eV",
        "H": "eV",
        "G": "eV",
        "Cv": "cal/mol K",
    }


def test_full_split_has_the_reference_sizes_and_is_a_disjoint_cover():
    splits = split_indices(130_831)
    assert {name: len(idx) for name, idx in splits.items()} == {"train": 100_000, "val": 17_748, "test": 13_083}
    everything = np.concatenate(list(splits.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(130_831))
    again = split_indices(130_831)
    for name in splits:
        np.testing.assert_array_equal(splits[name], again[name])


def test_subset_split_keeps_the_proportions():
    assert split_sizes(SUBSET) == {"train": 764, "val": 136, "test": 100}
    assert split_sizes(1) == {"train": 1, "val": 0, "test": 0}
    with pytest.raises(ValueError):
        split_sizes(0)


def test_dataset_shape_and_splits(dataset):
    assert dataset.num_molecules == SUBSET
    # QM9 indices from 1; qm9pack leaves out the 3,054 molecules that failed QM9's own checks
    assert dataset.molecule_ids[0] == 1 and np.all(np.diff(dataset.molecule_ids) > 0)
    assert {name: len(idx) for name, idx in dataset.splits.items()} == split_sizes(SUBSET)
    everything = np.concatenate(list(dataset.splits.values()))
    np.testing.assert_array_equal(np.sort(everything), np.arange(SUBSET))
    assert dataset.targets.shape == (SUBSET, 12) and dataset.targets.dtype == np.float32
    assert dataset.task == "homo" and dataset.unit == "eV"


def test_first_molecule_is_methane_with_targets_in_their_units(dataset):
    graph = dataset.graph(0, normalised=False)
    np.testing.assert_array_equal(graph.nodes["features"], node_features([6, 1, 1, 1, 1]))
    np.testing.assert_allclose(graph.nodes["positions"][1], [0.002150416, -0.0060313176, 0.0019761204], rtol=1e-6)
    np.testing.assert_array_equal(graph.senders, [0, 1, 0, 2, 0, 3, 0, 4])  # paired edges
    np.testing.assert_array_equal(graph.receivers, [1, 0, 2, 0, 3, 0, 4, 0])
    np.testing.assert_array_equal(graph.edges["features"], np.tile(np.eye(4)[0], (8, 1)))
    assert graph.globals["target"].dtype == np.float32
    np.testing.assert_array_equal(graph.globals["target"], [np.float32(-0.3877 * HARTREE_TO_EV)])
    names = list(TARGETS)
    assert dataset.targets[0, names.index("alpha")] == np.float32(13.21)
    assert dataset.targets[0, names.index("U0")] == np.float32(-40.47893 * HARTREE_TO_EV)
    assert dataset.targets[0, names.index("Cv")] == np.float32(6.469)


def test_qm9_bonds_are_kekule_as_the_reference(dataset):
    """Double bonds are found and aromatic rings come out as alternating single/double bonds:
    the aromatic column is always 0, as in NVIDIA's unsanitised SDF reading."""
    assert np.mean(dataset.bond_types == BOND_TYPES.index("double")) > 0.01
    assert not np.any(dataset.bond_types == BOND_TYPES.index("aromatic"))
    assert set(np.unique(dataset.bond_types)) <= {0, 1, 2}


def test_normalisation_uses_train_statistics_only(dataset):
    homo = dataset.targets[:, list(TARGETS).index("homo")].astype(np.float64)
    train = homo[dataset.splits["train"]]
    assert dataset.target_mean == pytest.approx(train.mean(), rel=1e-12)
    assert dataset.target_std == pytest.approx(train.std(), rel=1e-12)
    assert dataset.target_mean != pytest.approx(homo.mean(), rel=1e-9)
    i = int(dataset.splits["val"][0])
    normalised = dataset.graph(i).globals["target"][0]
    assert normalised == np.float32((homo[i] - train.mean()) / train.std())
    assert not dataset.normalisation.atom_reference  # an intensive target: no atom references
    back = dataset.normalisation.to_unit(np.array([normalised]), dataset.element_counts[[i]])
    assert back[0] == pytest.approx(homo[i], rel=1e-6)


def test_extensive_targets_subtract_per_atom_references_fitted_on_train(qm9_subset_cache):
    """U0 spans hundreds of eV with molecule size; less the per-element references fitted on the
    training split, what the model learns is a residual of a few eV."""
    dataset = load_qm9(qm9_subset_cache, "U0", max_molecules=400, num_workers=1)
    norm = dataset.normalisation
    assert set(norm.atom_reference) <= {1, 6, 7, 8, 9} and {1, 6} <= set(norm.atom_reference)
    u0 = dataset.task_targets.astype(np.float64)
    assert u0.std() > 50 and norm.std < 0.1 * u0.std()  # eV: the references take out the size
    train = dataset.splits["train"]
    expected_fit, *_ = np.linalg.lstsq(dataset.element_counts[train], u0[train], rcond=None)
    np.testing.assert_allclose([norm.atom_reference[z] for z in (1, 6)], expected_fit[:2], rtol=1e-6)
    i = int(dataset.splits["test"][0])
    back = norm.to_unit(dataset.normalised_targets([i]), dataset.element_counts[[i]])
    assert back[0] == pytest.approx(u0[i], rel=1e-9)
    assert Normalisation.from_json(json.loads(json.dumps(norm.to_json()))) == norm


def test_batch_graphs_equals_batching_single_graphs(dataset):
    indices = [5, 0, 999, 17]
    expected = jax.tree_util.tree_leaves(jraph.batch_np([dataset.graph(i) for i in indices]))
    got = jax.tree_util.tree_leaves(dataset.batch_graphs(indices))
    assert len(expected) == len(got) == 8
    for x, y in zip(expected, got):
        np.testing.assert_array_equal(x, y)
        assert y.dtype in (np.float32, np.int32)  # jraph.batch_np widens indices to int64


def test_stats_match_the_arrays(dataset):
    train = dataset.splits["train"]
    stats = dataset.stats(train)
    assert stats == {
        "mean_nodes": float(dataset.num_nodes[train].mean()),
        "mean_edges": float(dataset.num_edges[train].mean()),
        "max_nodes": int(dataset.num_nodes[train].max()),
        "max_edges": int(dataset.num_edges[train].max()),
    }
    assert 5 <= stats["mean_nodes"] <= 29 and stats["max_edges"] >= stats["max_nodes"]


def test_second_load_reads_the_cache(dataset, cache_dir, monkeypatch):
    def no_processing(*args, **kwargs):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(qm9_cache, "process_qm9", no_processing)
    again = load_qm9(cache_dir, task="gap", max_molecules=SUBSET)
    assert qm9_cache.cache_path(cache_dir, SUBSET).name == f"qm9_bond_graphs_first{SUBSET}.npz"
    for key in qm9_source.ARRAY_KEYS:
        np.testing.assert_array_equal(getattr(again, key), getattr(dataset, key))
    assert again.unit == "eV" and again.target_mean != dataset.target_mean


def test_unknown_task_raises_listing_valid_tasks(cache_dir):
    with pytest.raises(ValueError, match="unknown QM9 task 'foo'; valid tasks: mu, alpha, homo"):
        load_qm9(cache_dir, task="foo", max_molecules=SUBSET)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "checksum", "version"])
def test_broken_cache_is_detected_logged_and_rebuilt(tmp_path, caplog, monkeypatch, damage):
    k = 300
    reference = load_qm9(tmp_path, max_molecules=k, num_workers=1)
    path = qm9_cache.cache_path(tmp_path, k)
    if damage == "garbage":
        path.write_bytes(b"\x00not a cache\xff" * 100)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "checksum":
        with np.load(path) as npz:
            contents = dict(npz)
        contents["positions"][0, 0] += 1.0  # a flipped value under the original checksum
        with open(path, "wb") as f:
            np.savez(f, **contents)
    elif damage == "version":
        monkeypatch.setattr(qm9_cache, "CACHE_FORMAT_VERSION", qm9_cache.CACHE_FORMAT_VERSION + 1)
    expected_reason = {
        "garbage": "unreadable",
        "truncated": "unreadable",
        "checksum": "checksum",
        "version": "format version",
    }[damage]
    with caplog.at_level(logging.WARNING):
        rebuilt = load_qm9(tmp_path, max_molecules=k, num_workers=1)
    messages = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("stale or corrupt" in m and expected_reason in m for m in messages), messages
    np.testing.assert_array_equal(rebuilt.positions, reference.positions)
    qm9_cache.load_cache(path, k)  # the rebuilt file is valid
    assert not list(tmp_path.glob("*.tmp"))


def test_precomputed_harmonics_match_the_model_geometry(dataset):
    from se3jax.basis import edge_geometry
    from se3jax.graphs import HARMONICS

    dataset.edge_harmonics = precompute_edge_harmonics(dataset, max_degree=3)
    try:
        assert dataset.edge_harmonics.shape == (len(dataset.senders), 49)
        batch = dataset.batch_graphs(np.arange(5))
        expected, _ = edge_geometry(batch.nodes["positions"], batch.senders, batch.receivers, 6)
        np.testing.assert_allclose(batch.edges[HARMONICS], expected, rtol=1e-5, atol=1e-6)
    finally:
        dataset.edge_harmonics = None  # the module-scoped dataset is shared


def test_portable_file_round_trips_and_refuses_corruption(cache_dir, tmp_path):
    """The compressed portable file decodes to exactly the cached arrays (checksum verified),
    loads through cache_dir without RDKit processing, and a damaged copy is refused."""
    arrays = qm9_cache.load_cache(qm9_cache.cache_path(cache_dir, SUBSET), SUBSET)
    path = tmp_path / qm9_cache.PORTABLE_FILE
    digest = qm9_cache.export_portable(arrays, path)
    assert (tmp_path / (qm9_cache.PORTABLE_FILE + ".sha256")).read_text().startswith(digest)
    assert path.stat().st_size < 0.6 * sum(a.nbytes for a in arrays.values())  # all of QM9: 32.6 of 64 MB
    decoded = qm9_cache.load_portable(path)
    for key in arrays:
        np.testing.assert_array_equal(decoded[key], arrays[key], err_msg=key)
    dataset = load_qm9(tmp_path, "homo")  # no cache file there: the portable file is used
    assert dataset.num_molecules == SUBSET
    first = load_qm9(tmp_path, "homo", max_molecules=100)
    np.testing.assert_array_equal(first.molecule_ids, arrays["molecule_ids"][:100])
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(qm9_cache.CacheError, match="unreadable|checksum"):
        qm9_cache.load_portable(path)


LIMITS = {"train": 12, "val": 4, "test": 4}  # a short run's split limits, scaled down


def _counting_processing(monkeypatch) -> list:
    """Record the QM9 ids whose bonds get inferred (in-process: num_workers=1)."""
    processed, real = [], qm9_source._process_record
    monkeypatch.setattr(qm9_source, "_process_record", lambda r: processed.append(r[0]) or real(r))
    return processed


@pytest.mark.parametrize("task", ["U0", "homo"])  # U0: normalisation with per-element references
def test_first_run_subset_on_an_empty_cache_equals_full_processing(tmp_path, monkeypatch, task):
    """The first-run path: only the first molecules of each split are processed, and the
    dataset equals the same molecules taken from a full processing (every array, the batches
    and the normalisation fitted on the whole training split)."""
    k = 80
    processed = _counting_processing(monkeypatch)
    subset = load_qm9(tmp_path, task, max_molecules=k, num_workers=1, split_limits=LIMITS)
    assert len(processed) == subset.num_molecules == sum(LIMITS.values())
    processed.clear()
    full_arrays = qm9_source.process_qm9(k, num_workers=1)
    full = QM9Dataset(**full_arrays, task=task, splits=split_indices(k))
    assert subset.normalisation == full.normalisation
    rows = np.sort(np.concatenate([full.splits[name][:limit] for name, limit in LIMITS.items()]))
    expected = qm9_cache.select_molecules(full_arrays, rows)
    for key in qm9_source.ARRAY_KEYS:
        np.testing.assert_array_equal(getattr(subset, key), expected[key], err_msg=key)
        assert getattr(subset, key).dtype == expected[key].dtype
    for name, limit in LIMITS.items():
        want = jax.tree_util.tree_leaves(full.batch_graphs(full.splits[name][:limit]))
        got = jax.tree_util.tree_leaves(subset.batch_graphs(subset.splits[name]))
        for x, y in zip(want, got, strict=True):
            np.testing.assert_array_equal(x, y)


def test_subset_cache_is_reused_keyed_by_its_molecules_and_read_from_a_full_cache(tmp_path, monkeypatch):
    k = 80
    first = load_qm9(tmp_path, "homo", max_molecules=k, num_workers=1, split_limits=LIMITS)
    processed = _counting_processing(monkeypatch)
    again = load_qm9(tmp_path, "gap", max_molecules=k, num_workers=1, split_limits=LIMITS)
    assert processed == [] and again.num_molecules == first.num_molecules
    np.testing.assert_array_equal(again.molecule_ids, first.molecule_ids)
    load_qm9(tmp_path, "homo", max_molecules=k, num_workers=1, split_limits={**LIMITS, "train": 13})
    assert len(processed) == 21 and len(list(tmp_path.glob("*_rows-*.npz"))) == 2  # another set, another file
    processed.clear()
    whole = load_qm9(tmp_path, "homo", max_molecules=k, num_workers=1)  # processes and caches all k
    assert len(processed) == k
    processed.clear()
    from_whole = load_qm9(tmp_path, "homo", max_molecules=k, num_workers=1, split_limits={**LIMITS, "val": 5})
    assert processed == [] and len(list(tmp_path.glob("*_rows-*.npz"))) == 2  # taken from the full cache
    np.testing.assert_array_equal(
        from_whole.molecule_ids[from_whole.splits["val"]], whole.molecule_ids[whole.splits["val"][:5]]
    )


def test_table_of_targets_and_elements_matches_full_processing():
    k = 30
    table = qm9_source.process_molecules([3, 7], k, num_workers=1)
    full = qm9_source.process_qm9(k, num_workers=1)
    np.testing.assert_array_equal(table["table_targets"], full["targets"])
    np.testing.assert_array_equal(table["table_element_counts"], qm9_source.element_counts(full))
    np.testing.assert_array_equal(table["molecule_ids"], full["molecule_ids"][[3, 7]])
    with pytest.raises(ValueError, match="sorted"):
        qm9_source.process_molecules([7, 3], k, num_workers=1)
