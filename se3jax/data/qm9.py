"""QM9 (130,831 molecules) from the ``qm9pack`` CSVs -> bond graphs -> on-disk cache -> splits.

The CSVs ship inside the ``qm9pack`` wheel, so nothing is downloaded. Processing (CSV parsing
and RDKit bond inference) runs once, in worker processes, and is cached as one ``.npz`` of
concatenated per-atom / per-edge arrays with per-molecule offsets; later runs load it in a tenth
of a second. The split is a permutation with the fixed seed ``SPLIT_SEED`` (independent of any
training seed): 100,000 train / 17,748 val / 13,083 test on the full data. A subset
(``max_molecules=K``: the first K molecules of the CSV, for tests and quick runs) is split the
same way in the same proportions, so its split is *not* a subset of the full data's split.

>>> split_sizes(130_831)
{'train': 100000, 'val': 17748, 'test': 13083}
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import dataclasses
import hashlib
import importlib.util
import logging
import multiprocessing
import os
import tempfile
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import jraph
import numpy as np
from tqdm import tqdm

from se3jax.data.molecules import (
    ATOMIC_NUMBERS,
    BondMethod,
    atomic_numbers_from,
    directed_edges,
    edge_features,
    infer_bond_list,
    node_features,
)
from se3jax.graphs import FEATURES, HARMONICS, POSITIONS, TARGET, molecule_graph

logger = logging.getLogger(__name__)

HARTREE_TO_EV = 27.211386
NUM_QM9_MOLECULES = 130_831
FULL_SPLIT_SIZES = {"train": 100_000, "val": 17_748, "test": 13_083}
SPLIT_SEED = 20_240_901  # fixed forever: changing it changes every reported test MAE
CACHE_FORMAT_VERSION = 3  # 2: bond directions adjacent (paired edges); 3: Kekule bond orders
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "se3jax")
CSV_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")

# name -> (CSV column, factor from the CSV's unit, unit after conversion)
TARGETS = collections.OrderedDict(
    [
        ("mu", ("Dipole_debye", 1.0, "D")),
        ("alpha", ("Polarizability_bohr3", 1.0, "bohr^3")),
        ("homo", ("HOMO_au", HARTREE_TO_EV, "eV")),
        ("lumo", ("LUMO_au", HARTREE_TO_EV, "eV")),
        ("gap", ("HOMO_LUMO_gap_au", HARTREE_TO_EV, "eV")),
        ("r2", ("R2_bohr2", 1.0, "bohr^2")),
        ("zpve", ("ZPVE_au", HARTREE_TO_EV, "eV")),
        ("U0", ("InternalEnergy_0K_au", HARTREE_TO_EV, "eV")),
        ("U", ("InternalEnergy_298K_au", HARTREE_TO_EV, "eV")),
        ("H", ("Enthalphy_298K_au", HARTREE_TO_EV, "eV")),
        ("G", ("GibbsFreeEnergy_298K_au", HARTREE_TO_EV, "eV")),
        ("Cv", ("Heatcapacity_Cv_cal_mol_K", 1.0, "cal/mol K")),
    ]
)

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


_ARRAY_KEYS = (
    "atom_offsets",
    "atomic_numbers",
    "positions",
    "edge_offsets",
    "senders",
    "receivers",
    "bond_types",
    "targets",
    "bond_methods",
    "molecule_ids",
)
_CHUNK = 256  # molecules per worker task


# ---------------------------------------------------------------------------------------------
# Reading the CSVs


def qm9pack_data_dir() -> Path:
    """The folder of qm9pack's CSVs, found without importing qm9pack (its ``__init__`` needs
    ``pkg_resources``, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the qm9pack package is not installed: pip install qm9pack")
    return Path(spec.submodule_search_locations[0]) / "data"


def _csv_rows(data_dir: Path, max_molecules: int | None) -> Iterator[dict]:
    """CSV rows in file order, stopping after ``max_molecules`` (reads no more than needed)."""
    csv.field_size_limit(1 << 30)
    count = 0
    for part in CSV_PARTS:
        with open(data_dir / part, newline="") as f:
            for row in csv.DictReader(f):
                if max_molecules is not None and count >= max_molecules:
                    return
                yield row
                count += 1


def _parse_list(text: str) -> list[str]:
    """``"[[1.0,2.0],[3.0,4.0]]"`` or ``"['C','H']"`` -> flat list of item strings."""
    return [item.strip().strip("'\"") for item in text.replace("[", "").replace("]", "").split(",") if item.strip()]


def _float(text: str) -> float:
    return float(text.replace("*^", "e"))  # Mathematica exponents appear in raw QM9 files


def _row_record(row: dict) -> tuple:
    """The fields a worker needs from one CSV row (small, picklable)."""
    targets = [_float(row[column]) * factor for column, factor, _ in TARGETS.values()]
    return int(row["Index"]), row["Elements"], row["XYZ_Ang"], targets


def _process_record(record: tuple) -> tuple:
    """One molecule: parse atoms and coordinates, infer bonds. Runs in a worker process."""
    molecule_id, elements_text, xyz_text, targets = record
    z = atomic_numbers_from(_parse_list(elements_text))
    positions = np.asarray([_float(v) for v in _parse_list(xyz_text)], np.float64).reshape(-1, 3)
    if len(positions) != len(z):
        raise ValueError(f"QM9 molecule {molecule_id}: {len(z)} elements but {len(positions)} positions")
    bonds, method = infer_bond_list(z, positions)
    senders, receivers, types = directed_edges(bonds)
    return molecule_id, z, positions, senders, receivers, types, targets, int(method)


def _process_chunk(records: list) -> dict[str, np.ndarray]:
    """A chunk of molecules as concatenated arrays: a few large arrays pickle back to the
    parent far faster than many small ones."""
    return _concatenate([_process_record(r) for r in records])


def _chunks(rows: Iterator[dict], size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(_row_record(row))
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


# ---------------------------------------------------------------------------------------------
# Processing and the cache


def _map_in_workers(fn, items: Iterator, num_workers: int) -> Iterator:
    """``map(fn, items)`` in order, in ``num_workers`` spawned processes with a bounded number
    of tasks in flight (so the CSV is read while workers compute, without loading it whole).

    Spawn, not fork: the parent runs JAX's threads. A ProcessPoolExecutor, not a Pool: a dead
    worker (e.g. a script without an ``if __name__ == "__main__"`` guard) raises
    ``BrokenProcessPool`` instead of hanging.
    """
    if num_workers <= 1:
        yield from map(fn, items)
        return
    context = multiprocessing.get_context("spawn")
    try:
        with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
            in_flight = collections.deque()
            for item in items:
                in_flight.append(executor.submit(fn, item))
                if len(in_flight) >= 4 * num_workers:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
    except concurrent.futures.process.BrokenProcessPool as e:
        raise RuntimeError(
            "QM9 processing: a worker process died. If load_qm9 is called at the top level of a "
            'script, put the call under `if __name__ == "__main__":` (worker processes are '
            "spawned and re-import the script), or pass num_workers=1"
        ) from e


def process_qm9(
    max_molecules: int | None = None, num_workers: int = 2, data_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """CSV -> the cache's arrays (see ``_ARRAY_KEYS``). Bond inference runs in ``num_workers``
    spawned processes (spawn, not fork: the parent has JAX's threads running)."""
    data_dir = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    total = NUM_QM9_MOLECULES if max_molecules is None else min(max_molecules, NUM_QM9_MOLECULES)
    chunks = _chunks(_csv_rows(data_dir, max_molecules), _CHUNK)
    start = time.perf_counter()
    parts = []
    with tqdm(total=total, desc="QM9: inferring bonds", unit="mol", mininterval=2.0) as progress:
        for part in _map_in_workers(_process_chunk, chunks, num_workers if total > _CHUNK else 1):
            parts.append(part)
            progress.update(len(part["molecule_ids"]))
    arrays = _merge(parts)
    methods = np.bincount(arrays["bond_methods"], minlength=len(BondMethod))
    logger.info(
        "QM9: processed %d molecules in %.1f s; bond orders from DetermineBonds: %d, "
        "Hueckel fallback: %d, connectivity-only fallback (all single): %d",
        len(arrays["molecule_ids"]),
        time.perf_counter() - start,
        *methods,
    )
    return arrays


def _concatenate(results: list) -> dict[str, np.ndarray]:
    """Per-molecule results -> concatenated arrays with offsets (local edge indices)."""
    ids, zs, positions, senders, receivers, types, targets, methods = zip(*results)
    atom_offsets = np.concatenate([[0], np.cumsum([len(z) for z in zs])]).astype(np.int64)
    edge_offsets = np.concatenate([[0], np.cumsum([len(s) for s in senders])]).astype(np.int64)
    return {
        "atom_offsets": atom_offsets,
        "atomic_numbers": np.concatenate(zs).astype(np.uint8),
        "positions": np.concatenate(positions).astype(np.float32),
        "edge_offsets": edge_offsets,
        "senders": np.concatenate(senders).astype(np.int16),
        "receivers": np.concatenate(receivers).astype(np.int16),
        "bond_types": np.concatenate(types).astype(np.uint8),
        "targets": np.asarray(targets, np.float32).reshape(-1, len(TARGETS)),
        "bond_methods": np.asarray(methods, np.uint8),
        "molecule_ids": np.asarray(ids, np.int32),
    }


def _merge(parts: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Concatenate chunks' arrays, shifting their offsets."""
    merged = {key: np.concatenate([p[key] for p in parts]) for key in _ARRAY_KEYS if not key.endswith("_offsets")}
    for key in ("atom_offsets", "edge_offsets"):
        counts = np.concatenate([np.diff(p[key]) for p in parts])
        merged[key] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return merged


def _checksum(arrays: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in _ARRAY_KEYS:
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.data)
    return digest.hexdigest()


def cache_path(cache_dir, max_molecules: int | None = None) -> Path:
    """The cache file: one per subset size; the format version is stored inside the file."""
    suffix = "" if max_molecules is None else f"_first{max_molecules}"
    return Path(cache_dir).expanduser() / f"qm9_bond_graphs{suffix}.npz"


def save_cache(path: Path, arrays: dict[str, np.ndarray], max_molecules: int | None) -> None:
    """Write atomically (temp file in the same folder, then rename): readers never see a
    half-written cache, and concurrent writers leave one complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": np.int64(CACHE_FORMAT_VERSION),
        "max_molecules": np.int64(-1 if max_molecules is None else max_molecules),
        "checksum": np.array(_checksum(arrays)),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **arrays, **meta)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


class CacheError(Exception):
    """The cache file is stale or unusable (the message says why); it gets rebuilt."""


def load_cache(path: Path, max_molecules: int | None) -> dict[str, np.ndarray]:
    """Read and verify a cache file; ``CacheError`` if stale, corrupt or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if "format_version" not in files:
                raise CacheError("no format version in it")
            version = int(npz["format_version"])
            if version != CACHE_FORMAT_VERSION:
                raise CacheError(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
            missing = [k for k in _ARRAY_KEYS + ("max_molecules", "checksum") if k not in files]
            if missing:
                raise CacheError(f"missing arrays {missing}")
            arrays = {key: npz[key] for key in _ARRAY_KEYS}
            stored_k, checksum = int(npz["max_molecules"]), str(npz["checksum"])
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CacheError(f"unreadable ({type(e).__name__}: {e})") from e
    if stored_k != (-1 if max_molecules is None else max_molecules):
        raise CacheError(f"built for max_molecules={stored_k}, wanted {max_molecules}")
    if _checksum(arrays) != checksum:
        raise CacheError("checksum mismatch (corrupt file)")
    return arrays


def load_or_build_cache(
    cache_dir=DEFAULT_CACHE_DIR, max_molecules: int | None = None, num_workers: int = 2
) -> dict[str, np.ndarray]:
    """The processed arrays: from the cache if it is valid, else from a portable file in
    ``cache_dir`` (:func:`export_portable`; no RDKit or qm9pack needed), else processed from
    the qm9pack CSVs and cached."""
    path = cache_path(cache_dir, max_molecules)
    if path.exists():
        try:
            return load_cache(path, max_molecules)
        except CacheError as e:
            logging.warning("QM9 cache %s is stale or corrupt (%s); rebuilding it", path, e)
    portable = Path(cache_dir).expanduser() / PORTABLE_FILE
    if portable.exists():
        arrays = load_portable(portable)
        return arrays if max_molecules is None else first_molecules(arrays, max_molecules)
    arrays = process_qm9(max_molecules, num_workers=num_workers)
    save_cache(path, arrays, max_molecules)
    logger.info("QM9: cached %d molecules in %s", len(arrays["molecule_ids"]), path)
    return arrays


def first_molecules(arrays: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The cache arrays of the first ``count`` molecules (what ``max_molecules`` selects)."""
    atoms, edges = arrays["atom_offsets"][: count + 1], arrays["edge_offsets"][: count + 1]
    out = {"atom_offsets": atoms, "edge_offsets": edges}
    for key in ("atomic_numbers", "positions"):
        out[key] = arrays[key][: atoms[-1]]
    for key in ("senders", "receivers", "bond_types"):
        out[key] = arrays[key][: edges[-1]]
    for key in ("targets", "bond_methods", "molecule_ids"):
        out[key] = arrays[key][:count]
    return out


# ---------------------------------------------------------------------------------------------
# The portable file: the processed dataset, compressed, to carry to machines without RDKit,
# qm9pack or internet (32.6 MB for all of QM9). Each bond is stored once (local atom indices
# as uint8) and its two directed edges rebuilt on load in the cache's paired order.

PORTABLE_FILE = f"qm9_portable_v{CACHE_FORMAT_VERSION}.npz"


def export_portable(arrays: dict[str, np.ndarray], path) -> str:
    """Write the cache arrays to a compressed portable file; returns its SHA-256 (also written
    to ``path + '.sha256'``). The decoded arrays' checksum is stored inside and verified on
    load."""
    path = Path(path)
    first = np.arange(0, len(arrays["senders"]), 2)
    if not (
        np.array_equal(arrays["senders"][first], arrays["receivers"][first + 1])
        and np.array_equal(arrays["receivers"][first], arrays["senders"][first + 1])
    ):
        raise ValueError("the arrays' edges are not paired (cache format 2 or later expected)")
    encoded = {
        "num_atoms": np.diff(arrays["atom_offsets"]).astype(np.uint8),
        "num_bonds": (np.diff(arrays["edge_offsets"]) // 2).astype(np.uint8),
        "atomic_numbers": arrays["atomic_numbers"],
        "positions": arrays["positions"],
        "bond_atoms": np.stack([arrays["senders"][first], arrays["receivers"][first]], 1).astype(np.uint8),
        "bond_types": arrays["bond_types"][first],
        "targets": arrays["targets"],
        "bond_methods": arrays["bond_methods"],
        "molecule_ids": arrays["molecule_ids"],
        "format_version": np.int64(CACHE_FORMAT_VERSION),
        "checksum": np.array(_checksum(arrays)),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez_compressed(f, **encoded)
    tmp.replace(path)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    Path(str(path) + ".sha256").write_text(f"{digest}  {path.name}\n")
    return digest


def load_portable(path) -> dict[str, np.ndarray]:
    """Decode a portable file into the cache arrays; ``CacheError`` if it is damaged, of
    another format version, or does not match its stored checksum."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            version = int(npz["format_version"])
            if version != CACHE_FORMAT_VERSION:
                raise CacheError(f"{path}: format version {version}, expected {CACHE_FORMAT_VERSION}")
            data = {key: npz[key] for key in npz.files}
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CacheError(f"{path}: unreadable portable QM9 file ({type(e).__name__}: {e})") from e
    bonds = data["bond_atoms"].astype(np.int16)
    arrays = {
        "atom_offsets": np.concatenate([[0], np.cumsum(data["num_atoms"].astype(np.int64))]),
        "edge_offsets": np.concatenate([[0], np.cumsum(2 * data["num_bonds"].astype(np.int64))]),
        "atomic_numbers": data["atomic_numbers"],
        "positions": data["positions"],
        "senders": bonds.reshape(-1),  # i -> j, then j -> i: the paired order
        "receivers": bonds[:, ::-1].reshape(-1),
        "bond_types": np.repeat(data["bond_types"], 2),
        "targets": data["targets"],
        "bond_methods": data["bond_methods"],
        "molecule_ids": data["molecule_ids"],
    }
    if _checksum(arrays) != str(data["checksum"]):
        raise CacheError(f"{path}: checksum mismatch (corrupt portable QM9 file)")
    return arrays


# ---------------------------------------------------------------------------------------------
# Splits and the dataset


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
    normalisation: Normalisation = dataclasses.field(init=False)
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
        train = self.splits["train"]
        y = self.task_targets[train].astype(np.float64)
        references = {}
        if self.task in EXTENSIVE_TARGETS and len(train) > len(ATOMIC_NUMBERS):
            fit, *_ = np.linalg.lstsq(self.element_counts[train], y, rcond=None)
            present = self.element_counts[train].sum(0) > 0
            references = {z: float(v) for z, v, p in zip(ATOMIC_NUMBERS, fit, present) if p}
        norm = Normalisation(self.task, self.unit, 0.0, 1.0, references)
        residual = y - norm.to_unit(np.zeros(len(train)), self.element_counts[train])
        std = float(residual.std()) if len(train) > 1 and residual.std() > 0 else 1.0
        self.normalisation = dataclasses.replace(norm, mean=float(residual.mean()), std=std)
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
        atoms = _ranges(self.atom_offsets[indices], n_node)
        edges = _ranges(self.edge_offsets[indices], n_edge)
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

    def precompute_harmonics(self, max_degree: int, chunk: int = 1 << 18) -> float:
        """Basis precomputation: the stacked spherical harmonics of every edge direction,
        ``[total_edges, (2 max_degree + 1)^2]`` float32, kept in host RAM and added to
        ``batch_graphs`` as ``edges["harmonics"]``. Compact: 49 numbers per edge for degrees
        0..3 (the model builds the 1,092 basis entries per edge from them on the fly), 0.96 GB
        for all of QM9. Returns the seconds it took."""
        import time

        import jax

        from se3jax.basis import harmonics_dim, safe_directions, stacked_harmonics

        start = time.perf_counter()
        shift = np.repeat(self.atom_offsets[:-1], self.num_edges)
        rel = (
            self.positions[self.receivers.astype(np.int64) + shift]
            - self.positions[self.senders.astype(np.int64) + shift]
        ).astype(np.float32)
        fn = jax.jit(lambda v: stacked_harmonics(safe_directions(v)[0], 2 * max_degree))
        out = np.empty((len(rel), harmonics_dim(2 * max_degree)), np.float32)
        for a in range(0, len(rel), chunk):
            part = rel[a : a + chunk]
            padded = np.pad(part, ((0, chunk - len(part)), (0, 0)))  # one compiled shape
            out[a : a + len(part)] = np.asarray(fn(padded))[: len(part)]
        self.edge_harmonics = out
        return time.perf_counter() - start

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


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each start and length, vectorised."""
    total = int(lengths.sum())
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


def load_qm9(
    cache_dir=DEFAULT_CACHE_DIR, task: str = "homo", max_molecules: int | None = None, num_workers: int = 2
) -> QM9Dataset:
    """QM9 for one regression ``task`` (a key of ``TARGETS``), processed once and cached in
    ``cache_dir``. ``max_molecules=K`` uses the first K molecules of the CSV (split in the
    full data's proportions)."""
    _check_task(task)
    if max_molecules is not None and max_molecules < 1:
        raise ValueError(f"max_molecules must be a positive integer or None, got {max_molecules}")
    arrays = load_or_build_cache(cache_dir, max_molecules, num_workers)
    return QM9Dataset(**arrays, task=task, splits=split_indices(len(arrays["molecule_ids"])))
