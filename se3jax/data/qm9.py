"""QM9 as a dataset: splits, normalisation and batches of bond graphs.

:func:`load_qm9` returns a :class:`QM9Dataset` for one regression target, from the cache
(:mod:`se3jax.data.qm9_cache`) or processed from the qm9pack CSVs
(:mod:`se3jax.data.qm9_source`). The split is a permutation with the fixed seed ``SPLIT_SEED``
(independent of any training seed): 100,000 train / 17,748 val / 13,083 test on the full data.
A subset (``max_molecules=K``: the first K molecules of the CSV, for tests and quick runs) is
split the same way in the same proportions, so its split is *not* a subset of the full data's
split. ``split_limits`` instead keeps the full data's split and loads only the first molecules
of each split (what a short run uses), processing only those.

>>> split_sizes(130_831)
{'train': 100000, 'val': 17748, 'test': 13083}
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jraph
import numpy as np

from se3jax.data.molecules import ATOMIC_NUMBERS, edge_features, node_features
from se3jax.data.qm9_cache import (
    DEFAULT_CACHE_DIR,
    concatenated_ranges,
    load_or_build_cache,
    load_or_build_subset,
)
from se3jax.data.qm9_source import ARRAY_KEYS, HARTREE_TO_EV, NUM_QM9_MOLECULES, TARGETS
from se3jax.graphs import FEATURES, HARMONICS, POSITIONS, TARGET, molecule_graph

__all__ = [  # HARTREE_TO_EV, TARGETS and DEFAULT_CACHE_DIR are defined with the CSV and the cache
    "DEFAULT_CACHE_DIR",
    "EXTENSIVE_TARGETS",
    "FULL_SPLIT_SIZES",
    "HARTREE_TO_EV",
    "NUM_QM9_MOLECULES",
    "QM9_SIZES",
    "SPLIT_SEED",
    "TARGETS",
    "TARGET_POOLING",
    "Normalisation",
    "QM9Dataset",
    "fit_normalisation",
    "load_qm9",
    "split_indices",
    "split_sizes",
]

FULL_SPLIT_SIZES = {"train": 100_000, "val": 17_748, "test": 13_083}
SPLIT_SEED = 20_240_901  # fixed forever: changing it changes every reported test MAE
# Above this share of the molecules, a run processes (and caches) all of them: a later run
# then finds them, and the subset would save little.
SUBSET_SHARE = 0.5

# Molecule sizes over all of QM9 (atoms, and directed bond edges): mean and max. The default
# padding budget of inference and of the benchmarks' synthetic batches.
QM9_SIZES = dict(mean_nodes=18.03, mean_edges=37.31, max_nodes=29, max_edges=56)

# Pooling per target. Extensive targets grow with the molecule (energies, zpve, heat capacity,
# polarisability, spatial extent): a sum of per-atom contributions represents them, and per-
# element reference values fitted on the training split take out the large size-dependent part,
# so the network learns a residual of a few eV rather than hundreds. Intensive targets (orbital
# energies, dipole moment) use max pooling, NVIDIA's choice for HOMO.
TARGET_POOLING = {
    "mu": "max",
    "alpha": "sum",
    "homo": "max",
    "lumo": "max",
    "gap": "max",
    "r2": "sum",
    "zpve": "sum",
    "U0": "sum",
    "U": "sum",
    "H": "sum",
    "G": "sum",
    "Cv": "sum",
}
EXTENSIVE_TARGETS = tuple(t for t, pooling in TARGET_POOLING.items() if pooling == "sum")


@dataclasses.dataclass(frozen=True)
class Normalisation:
    """How the model's output maps to a target in its unit:
    ``y = output * std + mean + sum over the molecule's atoms of atom_reference[Z]``
    (references empty for intensive targets). Saved as ``normalisation.json`` in a workdir.

    >>> n = Normalisation("U0", "eV", mean=-2.0, std=0.5, atom_reference={1: -10.0, 6: -1000.0})
    >>> float(n.to_unit(np.array([1.0]), np.array([[4, 1, 0, 0, 0]]))[0])  # CH4: 4 H, 1 C
    -1041.5
    """

    task: str
    unit: str
    mean: float
    std: float
    atom_reference: dict[int, float] = dataclasses.field(default_factory=dict)

    def reference_table(self) -> np.ndarray:
        """``[10]`` reference value per atomic number (0 where none)."""
        table = np.zeros(max(ATOMIC_NUMBERS) + 1)
        for z, value in self.atom_reference.items():
            table[int(z)] = value
        return table

    def to_unit(self, output, element_counts) -> np.ndarray:
        """Normalised outputs ``[M]`` and per-molecule counts ``[M, 5]`` of H, C, N, O, F -> unit."""
        refs = self.reference_table()[list(ATOMIC_NUMBERS)]
        return np.asarray(output) * self.std + self.mean + np.asarray(element_counts) @ refs

    def to_json(self) -> dict:
        return {
            "task": self.task,
            "unit": self.unit,
            "mean": self.mean,
            "std": self.std,
            "atom_reference": {str(z): v for z, v in self.atom_reference.items()},
        }

    @classmethod
    def from_json(cls, data: dict) -> Normalisation:
        refs = {int(z): float(v) for z, v in data.get("atom_reference", {}).items()}
        return cls(data["task"], data["unit"], float(data["mean"]), float(data["std"]), refs)


def fit_normalisation(task: str, targets, element_counts) -> Normalisation:
    """The normalisation of ``task`` fitted on the training split: its targets ``[T]`` (in the
    unit) and element counts ``[T, 5]``. Extensive targets first subtract per-element
    references (least squares over the counts); mean and std are those of the residual."""
    unit = TARGETS[task][2]
    y = np.asarray(targets).astype(np.float64)
    counts = np.asarray(element_counts, np.float64)
    references = {}
    if task in EXTENSIVE_TARGETS and len(y) > len(ATOMIC_NUMBERS):
        fit, *_ = np.linalg.lstsq(counts, y, rcond=None)
        present = counts.sum(0) > 0
        references = {z: float(v) for z, v, p in zip(ATOMIC_NUMBERS, fit, present) if p}
    norm = Normalisation(task, unit, 0.0, 1.0, references)
    residual = y - norm.to_unit(np.zeros(len(y)), counts)
    std = float(residual.std()) if len(y) > 1 and residual.std() > 0 else 1.0
    return dataclasses.replace(norm, mean=float(residual.mean()), std=std)


def split_sizes(num_molecules: int) -> dict[str, int]:
    """Train/val/test sizes: exactly 100,000/17,748/13,083 for the full 130,831 molecules,
    the same proportions (rounded, test takes the remainder) for a subset."""
    if num_molecules < 1:
        raise ValueError(f"cannot split {num_molecules} molecules")
    train = (num_molecules * FULL_SPLIT_SIZES["train"] + NUM_QM9_MOLECULES // 2) // NUM_QM9_MOLECULES
    val = (num_molecules * FULL_SPLIT_SIZES["val"] + NUM_QM9_MOLECULES // 2) // NUM_QM9_MOLECULES
    return {"train": train, "val": val, "test": num_molecules - train - val}


def split_indices(num_molecules: int, seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
    """Disjoint index arrays (each sorted) covering ``range(num_molecules)``, from a permutation
    seeded by the fixed ``SPLIT_SEED`` (not the training seed)."""
    sizes = split_sizes(num_molecules)
    permutation = np.random.default_rng(seed).permutation(num_molecules)
    bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
    return {name: np.sort(permutation[bounds[k] : bounds[k + 1]]) for k, name in enumerate(("train", "val", "test"))}


def _check_task(task: str) -> int:
    if task not in TARGETS:
        raise ValueError(f"unknown QM9 task {task!r}; valid tasks: {', '.join(TARGETS)}")
    return list(TARGETS).index(task)


@dataclasses.dataclass
class QM9Dataset:
    """QM9 as concatenated arrays with offsets, one regression task, splits and train stats.

    Molecule ``i`` has atoms ``atom_offsets[i]:atom_offsets[i+1]`` and edges
    ``edge_offsets[i]:edge_offsets[i+1]`` (``senders``/``receivers`` local to the molecule).
    ``targets`` holds all 12 targets in their units (columns in ``TARGETS`` order).
    """

    atom_offsets: np.ndarray
    atomic_numbers: np.ndarray
    positions: np.ndarray
    edge_offsets: np.ndarray
    senders: np.ndarray
    receivers: np.ndarray
    bond_types: np.ndarray
    targets: np.ndarray
    bond_methods: np.ndarray
    molecule_ids: np.ndarray
    task: str
    splits: dict[str, np.ndarray]
    normalisation: Normalisation | None = None  # None: fitted on the train split's molecules
    edge_harmonics: np.ndarray | None = dataclasses.field(default=None, init=False)

    def __post_init__(self):
        self.task_index = _check_task(self.task)
        self.unit = TARGETS[self.task][2]
        self.num_nodes = np.diff(self.atom_offsets).astype(np.int32)
        self.num_edges = np.diff(self.edge_offsets).astype(np.int32)
        # element counts per molecule [M, 5] (H, C, N, O, F)
        molecule = np.repeat(np.arange(self.num_molecules), self.num_nodes)
        element = np.searchsorted(np.asarray(ATOMIC_NUMBERS), self.atomic_numbers)
        self.element_counts = np.zeros((self.num_molecules, len(ATOMIC_NUMBERS)))
        np.add.at(self.element_counts, (molecule, element), 1.0)
        if self.normalisation is None:
            train = self.splits["train"]
            self.normalisation = fit_normalisation(self.task, self.task_targets[train], self.element_counts[train])
        self.reference_sums = self.element_counts @ self.normalisation.reference_table()[list(ATOMIC_NUMBERS)]

    @property
    def target_mean(self) -> float:
        return self.normalisation.mean

    @property
    def target_std(self) -> float:
        return self.normalisation.std

    @property
    def num_molecules(self) -> int:
        return len(self.molecule_ids)

    @property
    def task_targets(self) -> np.ndarray:
        """The chosen task's targets ``[M]`` in its unit (``self.unit``)."""
        return self.targets[:, self.task_index]

    def normalised_targets(self, indices) -> np.ndarray:
        """The model's training targets for molecules ``indices``: the task's values less their
        atoms' reference values, standardised with the training split's statistics."""
        indices = np.asarray(indices)
        residual = self.task_targets[indices].astype(np.float64) - self.reference_sums[indices]
        return (residual - self.target_mean) / self.target_std

    def graph(self, i: int, normalised: bool = True) -> jraph.GraphsTuple:
        """Molecule ``i`` as an unpadded GraphsTuple with ``globals={"target": [1] float32}``."""
        a0, a1 = self.atom_offsets[i], self.atom_offsets[i + 1]
        e0, e1 = self.edge_offsets[i], self.edge_offsets[i + 1]
        target = self.normalised_targets(i) if normalised else self.task_targets[i]
        return molecule_graph(
            self.positions[a0:a1],
            node_features(self.atomic_numbers[a0:a1]),
            self.senders[e0:e1],
            self.receivers[e0:e1],
            edge_features(self.bond_types[e0:e1]),
            {TARGET: np.float32(target)},
        )

    def batch_graphs(self, indices, normalised: bool = True) -> jraph.GraphsTuple:
        """Molecules ``indices`` batched into one unpadded GraphsTuple (vectorised; equal to
        ``jraph.batch_np([self.graph(i) for i in indices])``)."""
        indices = np.asarray(indices, np.int64).reshape(-1)
        n_node, n_edge = self.num_nodes[indices], self.num_edges[indices]
        atoms = concatenated_ranges(self.atom_offsets[indices], n_node)
        edges = concatenated_ranges(self.edge_offsets[indices], n_edge)
        node_shift = np.repeat(np.cumsum(n_node) - n_node, n_edge)
        target = self.normalised_targets(indices) if normalised else self.task_targets[indices]
        z = self.atomic_numbers[atoms]
        edge_data = {FEATURES: edge_features(self.bond_types[edges])}
        if self.edge_harmonics is not None:
            edge_data[HARMONICS] = self.edge_harmonics[edges]
        return jraph.GraphsTuple(
            nodes={POSITIONS: self.positions[atoms].astype(np.float32), FEATURES: node_features(z)},
            edges=edge_data,
            senders=(self.senders[edges].astype(np.int32) + node_shift).astype(np.int32),
            receivers=(self.receivers[edges].astype(np.int32) + node_shift).astype(np.int32),
            n_node=n_node.astype(np.int32),
            n_edge=n_edge.astype(np.int32),
            globals={TARGET: target.astype(np.float32)},
        )

    def stats(self, indices=None) -> dict[str, float]:
        """Mean/max nodes and edges per molecule over ``indices`` (default all): the keyword
        arguments of ``PaddingBudget.for_batch``."""
        indices = np.arange(self.num_molecules) if indices is None else np.asarray(indices)
        n_node, n_edge = self.num_nodes[indices], self.num_edges[indices]
        return {
            "mean_nodes": float(n_node.mean()),
            "mean_edges": float(n_edge.mean()),
            "max_nodes": int(n_node.max()),
            "max_edges": int(n_edge.max()),
        }


def load_qm9(
    cache_dir=DEFAULT_CACHE_DIR,
    task: str = "homo",
    max_molecules: int | None = None,
    num_workers: int = 2,
    split_limits: Mapping[str, int] | None = None,
) -> QM9Dataset:
    """QM9 for one regression ``task`` (a key of ``TARGETS``), processed once and cached in
    ``cache_dir``. ``max_molecules=K`` uses the first K molecules of the CSV (split in the
    full data's proportions).

    ``split_limits={"train": k, "val": k2, "test": k3}`` (0 or absent = the whole split): the
    dataset holds only the first ``k`` molecules of each split, so only their bonds are inferred
    (a short run's first start processes a few thousand molecules, not 130,831). The split and
    the normalisation are still those of all molecules, so training on it is identical to
    training on the first ``k`` of each split of the whole dataset; ``splits`` index the rows
    of this smaller dataset. When the limits cover most molecules, all are processed and cached
    (later runs of any size then reuse them)."""
    _check_task(task)
    if max_molecules is not None and max_molecules < 1:
        raise ValueError(f"max_molecules must be a positive integer or None, got {max_molecules}")
    total = NUM_QM9_MOLECULES if max_molecules is None else min(max_molecules, NUM_QM9_MOLECULES)
    splits = split_indices(total)
    limited = {name: idx[: (split_limits or {}).get(name) or None] for name, idx in splits.items()}
    needed = np.sort(np.concatenate(list(limited.values())))
    if len(needed) == total:
        arrays = load_or_build_cache(cache_dir, max_molecules, num_workers)
        return QM9Dataset(**arrays, task=task, splits=split_indices(len(arrays["molecule_ids"])))
    if len(needed) > SUBSET_SHARE * total:
        load_or_build_cache(cache_dir, max_molecules, num_workers)  # all, cached: the subset comes from it
    arrays = load_or_build_subset(cache_dir, needed, max_molecules, num_workers)
    if len(arrays["table_targets"]) != total:
        raise ValueError(f"expected {total} QM9 molecules, the CSV has {len(arrays['table_targets'])}")
    train = splits["train"]
    normalisation = fit_normalisation(
        task, arrays["table_targets"][train, _check_task(task)], arrays["table_element_counts"][train]
    )
    rows_of = {name: np.searchsorted(needed, idx) for name, idx in limited.items()}
    return QM9Dataset(**{k: arrays[k] for k in ARRAY_KEYS}, task=task, splits=rows_of, normalisation=normalisation)
