"""QM9 from the ``qm9pack`` CSVs: reading the rows and perceiving bonds, in worker processes.

The CSVs ship inside the ``qm9pack`` wheel, so nothing is downloaded. Each molecule's atoms
and coordinates are parsed and its bonds inferred with RDKit (the expensive part, ~1 ms per
molecule); the result is a dict of concatenated per-atom / per-edge arrays with per-molecule
offsets (``ARRAY_KEYS``), which :mod:`se3jax.data.qm9_cache` stores on disk.
:func:`process_qm9` processes the first K molecules (or all); :func:`process_molecules` only
the molecules a run needs, plus the cheap table of every molecule's targets and element counts
that the training split's normalisation needs.

>>> list(TARGETS)[:3], TARGETS["homo"][2]
(['mu', 'alpha', 'homo'], 'eV')
"""

from __future__ import annotations

import collections
import concurrent.futures
import concurrent.futures.process
import csv
import importlib.util
import logging
import multiprocessing
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from se3jax.data.molecules import (
    ATOMIC_NUMBERS,
    ELEMENTS,
    BondMethod,
    atomic_numbers_from,
    directed_edges,
    infer_bond_list,
)

logger = logging.getLogger(__name__)

HARTREE_TO_EV = 27.211386
NUM_QM9_MOLECULES = 130_831
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

# The processed arrays. Molecule i has atoms atom_offsets[i]:atom_offsets[i+1] and edges
# edge_offsets[i]:edge_offsets[i+1] (senders/receivers local to the molecule, paired edges).
ARRAY_KEYS = (
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
# The table of every molecule (no bonds needed): what normalisation is fitted from.
TABLE_KEYS = ("table_targets", "table_element_counts")
_CHUNK = 256  # molecules per worker task


def qm9pack_data_dir() -> Path:
    """The folder of qm9pack's CSVs, found without importing qm9pack (its ``__init__`` needs
    ``pkg_resources``, which recent setuptools no longer ship)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the qm9pack package is not installed: pip install qm9pack")
    return Path(spec.submodule_search_locations[0]) / "data"


def _csv_rows(data_dir: Path, max_molecules: int | None) -> Iterator[dict]:
    """CSV rows in file order, stopping after ``max_molecules`` (reads no more than needed).
    Rows are ``{column: text}`` dicts built from ``csv.reader`` (DictReader is slower)."""
    csv.field_size_limit(1 << 30)
    count = 0
    for part in CSV_PARTS:
        with open(data_dir / part, newline="") as f:
            reader = csv.reader(f)
            header = next(reader)
            for values in reader:
                if max_molecules is not None and count >= max_molecules:
                    return
                yield dict(zip(header, values))
                count += 1


def _parse_list(text: str) -> list[str]:
    """``"[[1.0,2.0],[3.0,4.0]]"`` or ``"['C','H']"`` -> flat list of item strings."""
    return [item.strip().strip("'\"") for item in text.replace("[", "").replace("]", "").split(",") if item.strip()]


def _float(text: str) -> float:
    return float(text.replace("*^", "e"))  # Mathematica exponents appear in raw QM9 files


def _row_targets(row: dict) -> list[float]:
    """The 12 targets of a row in their units (float64; stored as float32)."""
    return [_float(row[column]) * factor for column, factor, _ in TARGETS.values()]


def _element_counts(row: dict) -> list[int]:
    """Counts of H, C, N, O, F in a row, from the same ``Elements`` column as the atoms (an
    element outside them raises, as in full processing)."""
    symbols = _parse_list(row["Elements"])
    counts = [symbols.count(symbol) for symbol in ELEMENTS]
    if sum(counts) != len(symbols):
        atomic_numbers_from(symbols)  # raises naming the unsupported element
    return counts


def _row_record(row: dict) -> tuple:
    """The fields a worker needs from one CSV row (small, picklable)."""
    return int(row["Index"]), row["Elements"], row["XYZ_Ang"], _row_targets(row)


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


def _chunks(records: Iterator[tuple], size: int) -> Iterator[list]:
    chunk = []
    for record in records:
        chunk.append(record)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


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


def _run(records: Iterator[tuple], total: int, num_workers: int) -> dict[str, np.ndarray]:
    """Bond perception for ``records`` (``total`` of them) in worker processes, merged."""
    start = time.perf_counter()
    parts = []
    chunks = _chunks(records, _CHUNK)
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


def process_qm9(
    max_molecules: int | None = None, num_workers: int = 2, data_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """CSV -> the arrays of ``ARRAY_KEYS`` for the first ``max_molecules`` molecules (all if
    None). Bond inference runs in ``num_workers`` spawned processes (spawn, not fork: the
    parent has JAX's threads running)."""
    data_dir = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    total = NUM_QM9_MOLECULES if max_molecules is None else min(max_molecules, NUM_QM9_MOLECULES)
    records = map(_row_record, _csv_rows(data_dir, max_molecules))
    return _run(records, total, num_workers)


def process_molecules(
    rows, max_molecules: int | None = None, num_workers: int = 2, data_dir: Path | None = None
) -> dict[str, np.ndarray]:
    """Only the molecules at CSV positions ``rows`` (sorted, unique, 0-based, within the first
    ``max_molecules``) -> their ``ARRAY_KEYS`` arrays, exactly as :func:`process_qm9` makes them,
    plus the ``TABLE_KEYS`` of *every* molecule of the first ``max_molecules`` (targets
    ``[M, 12]`` float32 and H, C, N, O, F counts ``[M, 5]``; no bonds needed). One pass over the
    CSV: the table is read while the workers infer the selected molecules' bonds."""
    rows = np.asarray(rows, np.int64)
    if rows.ndim != 1 or np.any(np.diff(rows) <= 0) or (rows.size and rows[0] < 0):
        raise ValueError("rows must be sorted, unique, non-negative CSV positions")
    data_dir = Path(data_dir) if data_dir is not None else qm9pack_data_dir()
    wanted = set(rows.tolist())
    targets, counts = [], []

    def selected_records():
        for k, row in enumerate(_csv_rows(data_dir, max_molecules)):
            targets.append(_row_targets(row))
            counts.append(_element_counts(row))
            if k in wanted:
                yield _row_record(row)

    arrays = _run(selected_records(), len(rows), num_workers)
    if len(arrays["molecule_ids"]) != len(rows):
        raise ValueError(f"asked for molecules up to CSV position {rows[-1]}, the CSV has {len(targets)} rows")
    arrays["table_targets"] = np.asarray(targets, np.float32).reshape(-1, len(TARGETS))
    arrays["table_element_counts"] = np.asarray(counts, np.uint8).reshape(-1, len(ATOMIC_NUMBERS))
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
    merged = {key: np.concatenate([p[key] for p in parts]) for key in ARRAY_KEYS if not key.endswith("_offsets")}
    for key in ("atom_offsets", "edge_offsets"):
        counts = np.concatenate([np.diff(p[key]) for p in parts])
        merged[key] = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    return merged


def element_counts(arrays: dict[str, np.ndarray]) -> np.ndarray:
    """Counts of H, C, N, O, F per molecule ``[M, 5]`` (uint8) from processed arrays: the
    table column :func:`process_molecules` reads from the CSV."""
    num_atoms = np.diff(arrays["atom_offsets"])
    molecule = np.repeat(np.arange(len(num_atoms)), num_atoms)
    element = np.searchsorted(np.asarray(ATOMIC_NUMBERS), arrays["atomic_numbers"])
    counts = np.zeros((len(num_atoms), len(ATOMIC_NUMBERS)), np.int64)
    np.add.at(counts, (molecule, element), 1)
    return counts.astype(np.uint8)
