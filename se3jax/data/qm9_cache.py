"""The processed QM9 arrays on disk: the checksummed cache, and the portable file.

Processing (:mod:`se3jax.data.qm9_source`) runs once and is cached as one ``.npz`` of the
concatenated arrays with per-molecule offsets; later runs load it in a tenth of a second. A
cache file holds one of:

- the first K molecules (or all): ``qm9_bond_graphs[_firstK].npz``;
- a subset -- only the molecules a short run needs, plus every molecule's targets and element
  counts for the normalisation: ``qm9_bond_graphs[_firstK]_rows-<digest>.npz``, keyed by the
  set of CSV positions. Its arrays equal those rows of a full processing.

Every file stores its format version and a checksum of its arrays and is written atomically;
a stale or damaged file is reported and rebuilt. The portable file (:func:`export_portable`)
carries the processed data to machines without RDKit, qm9pack or internet.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from se3jax.data.qm9_source import ARRAY_KEYS, TABLE_KEYS, element_counts, process_molecules, process_qm9

logger = logging.getLogger(__name__)

CACHE_FORMAT_VERSION = 3  # 2: bond directions adjacent (paired edges); 3: Kekule bond orders
DEFAULT_CACHE_DIR = os.path.join(os.path.expanduser("~"), ".cache", "se3jax")
SUBSET_KEYS = ARRAY_KEYS + TABLE_KEYS + ("rows",)


class CacheError(Exception):
    """The cache file is stale or unusable (the message says why); it gets rebuilt."""


def _checksum(arrays: dict[str, np.ndarray], keys=ARRAY_KEYS) -> str:
    """SHA-256 over the arrays ``keys``: names, dtypes, shapes and bytes."""
    digest = hashlib.sha256()
    for key in keys:
        a = np.ascontiguousarray(arrays[key])
        digest.update(f"{key}:{a.dtype.str}:{a.shape};".encode())
        digest.update(a.data)
    return digest.hexdigest()


def cache_path(cache_dir, max_molecules: int | None = None) -> Path:
    """The cache file: one per subset size; the format version is stored inside the file."""
    suffix = "" if max_molecules is None else f"_first{max_molecules}"
    return Path(cache_dir).expanduser() / f"qm9_bond_graphs{suffix}.npz"


def subset_cache_path(cache_dir, rows, max_molecules: int | None = None) -> Path:
    """The cache file of the molecules at CSV positions ``rows``: named by a digest of them."""
    digest = hashlib.sha256(np.asarray(rows, np.int64).tobytes()).hexdigest()[:16]
    whole = cache_path(cache_dir, max_molecules)
    return whole.with_name(f"{whole.stem}_rows-{digest}.npz")


def save_cache(path: Path, arrays: dict[str, np.ndarray], max_molecules: int | None, keys=ARRAY_KEYS) -> None:
    """Write atomically (temp file in the same folder, then rename): readers never see a
    half-written cache, and concurrent writers leave one complete file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {
        "format_version": np.int64(CACHE_FORMAT_VERSION),
        "max_molecules": np.int64(-1 if max_molecules is None else max_molecules),
        "checksum": np.array(_checksum(arrays, keys)),
    }
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, **{key: arrays[key] for key in keys}, **meta)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_cache(path: Path, max_molecules: int | None, keys=ARRAY_KEYS) -> dict[str, np.ndarray]:
    """Read and verify a cache file; ``CacheError`` if stale, corrupt or inconsistent."""
    try:
        with np.load(path, allow_pickle=False) as npz:
            files = set(npz.files)
            if "format_version" not in files:
                raise CacheError("no format version in it")
            version = int(npz["format_version"])
            if version != CACHE_FORMAT_VERSION:
                raise CacheError(f"format version {version}, expected {CACHE_FORMAT_VERSION}")
            missing = [k for k in tuple(keys) + ("max_molecules", "checksum") if k not in files]
            if missing:
                raise CacheError(f"missing arrays {missing}")
            arrays = {key: npz[key] for key in keys}
            stored_k, stored_checksum = int(npz["max_molecules"]), str(npz["checksum"])
    except CacheError:
        raise
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise CacheError(f"unreadable ({type(e).__name__}: {e})") from e
    if stored_k != (-1 if max_molecules is None else max_molecules):
        raise CacheError(f"built for max_molecules={stored_k}, wanted {max_molecules}")
    if _checksum(arrays, keys) != stored_checksum:
        raise CacheError("checksum mismatch (corrupt file)")
    return arrays


def _load_valid(path: Path, max_molecules: int | None, keys=ARRAY_KEYS) -> dict[str, np.ndarray] | None:
    """The cache file's arrays, or None if it is absent, or stale or corrupt (logged)."""
    if not path.exists():
        return None
    try:
        return load_cache(path, max_molecules, keys)
    except CacheError as e:
        logging.warning("QM9 cache %s is stale or corrupt (%s); rebuilding it", path, e)
        return None


def _stored(cache_dir, max_molecules: int | None) -> dict[str, np.ndarray] | None:
    """The first ``max_molecules`` (or all) from a valid cache or a portable file, if any."""
    arrays = _load_valid(cache_path(cache_dir, max_molecules), max_molecules)
    if arrays is not None:
        return arrays
    portable = Path(cache_dir).expanduser() / PORTABLE_FILE
    if portable.exists():
        arrays = load_portable(portable)
        return arrays if max_molecules is None else first_molecules(arrays, max_molecules)
    return None


def load_or_build_cache(cache_dir=DEFAULT_CACHE_DIR, max_molecules: int | None = None, num_workers: int = 2):
    """The processed arrays: from the cache if it is valid, else from a portable file in
    ``cache_dir`` (:func:`export_portable`; no RDKit or qm9pack needed), else processed from
    the qm9pack CSVs and cached."""
    arrays = _stored(cache_dir, max_molecules)
    if arrays is not None:
        return arrays
    arrays = process_qm9(max_molecules, num_workers=num_workers)
    path = cache_path(cache_dir, max_molecules)
    save_cache(path, arrays, max_molecules)
    logger.info("QM9: cached %d molecules in %s", len(arrays["molecule_ids"]), path)
    return arrays


def load_or_build_subset(cache_dir, rows, max_molecules: int | None = None, num_workers: int = 2):
    """The molecules at CSV positions ``rows`` (sorted) of the first ``max_molecules``, with the
    table (``TABLE_KEYS``) of all of them: taken from the full cache or a portable file when
    there is one, else from this subset's cache, else processed (only these molecules' bonds)
    and cached under a name keyed by ``rows``."""
    rows = np.asarray(rows, np.int64)
    stored = _stored(cache_dir, max_molecules)
    if stored is not None:
        return {
            **select_molecules(stored, rows),
            "table_targets": stored["targets"],
            "table_element_counts": element_counts(stored),
            "rows": rows,
        }
    path = subset_cache_path(cache_dir, rows, max_molecules)
    arrays = _load_valid(path, max_molecules, SUBSET_KEYS)
    if arrays is not None and np.array_equal(arrays["rows"], rows):
        return arrays
    arrays = {**process_molecules(rows, max_molecules, num_workers=num_workers), "rows": rows}
    save_cache(path, arrays, max_molecules, SUBSET_KEYS)
    logger.info("QM9: cached %d of %d molecules in %s", len(rows), len(arrays["table_targets"]), path)
    return arrays


def first_molecules(arrays: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The cache arrays of the first ``count`` molecules (what ``max_molecules`` selects)."""
    return select_molecules(arrays, np.arange(min(count, len(arrays["molecule_ids"]))))


def select_molecules(arrays: dict[str, np.ndarray], rows) -> dict[str, np.ndarray]:
    """The cache arrays of the molecules ``rows`` (in that order), offsets rebuilt."""
    rows = np.asarray(rows, np.int64)
    atom_offsets, edge_offsets = arrays["atom_offsets"], arrays["edge_offsets"]
    num_atoms, num_edges = np.diff(atom_offsets)[rows], np.diff(edge_offsets)[rows]
    atoms = concatenated_ranges(atom_offsets[rows], num_atoms)
    edges = concatenated_ranges(edge_offsets[rows], num_edges)
    out = {
        "atom_offsets": np.concatenate([[0], np.cumsum(num_atoms)]).astype(np.int64),
        "edge_offsets": np.concatenate([[0], np.cumsum(num_edges)]).astype(np.int64),
    }
    for key in ("atomic_numbers", "positions"):
        out[key] = arrays[key][atoms]
    for key in ("senders", "receivers", "bond_types"):
        out[key] = arrays[key][edges]
    for key in ("targets", "bond_methods", "molecule_ids"):
        out[key] = arrays[key][rows]
    return out


def concatenated_ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Concatenation of ``arange(s, s + n)`` for each start and length, vectorised.

    >>> concatenated_ranges(np.array([5, 0]), np.array([2, 3])).tolist()
    [5, 6, 0, 1, 2]
    """
    total = int(lengths.sum())
    offsets = np.repeat(starts - (np.cumsum(lengths) - lengths), lengths)
    return np.arange(total, dtype=np.int64) + offsets


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
