"""Molecules -> bond graphs: the chemistry shared by the QM9 pipeline and by prediction.

A molecule is its atomic numbers ``[N]`` and positions ``[N, 3]`` (Angstrom). Nodes are atoms
with features one-hot(H, C, N, O, F) + Z; edges are the chemical bonds, in both directions,
with a one-hot bond type (single, double, triple, aromatic). Bonds come from RDKit's
``DetermineBonds`` (xyz2mol) so that a user's xyz file gets the same graph as the training data.

>>> g = molecule_to_graph(["O", "H", "H"], [[0, 0, 0], [0.96, 0, 0], [-0.24, 0.93, 0]])
>>> g.nodes["features"].shape, g.senders.tolist(), g.receivers.tolist()
((3, 6), [0, 1, 0, 2], [1, 0, 2, 0])
"""

from __future__ import annotations

import contextlib
import enum
import logging
import os
import sys

import jraph
import numpy as np

from se3jax.graphs import TARGET, molecule_graph

logger = logging.getLogger(__name__)

# RDKit is imported inside the functions that use it (bond perception): training from a cache
# or a portable file, and everything else here, runs without it (scripts/export_qm9.py).

ELEMENTS = ("H", "C", "N", "O", "F")
ATOMIC_NUMBERS = (1, 6, 7, 8, 9)
NODE_FEATURES_DIM = len(ELEMENTS) + 1
BOND_TYPES = ("single", "double", "triple", "aromatic")
EDGE_FEATURES_DIM = len(BOND_TYPES)

# Atoms closer than this are an input error (the shortest bond, H-H, is 0.74 A; QM9's shortest
# interatomic distance is about 0.96 A): bonds and edge directions would be meaningless.
MIN_ATOM_DISTANCE = 0.5

_Z_BY_SYMBOL = dict(zip(ELEMENTS, ATOMIC_NUMBERS))
_ELEMENT_INDEX_BY_Z = np.full(max(ATOMIC_NUMBERS) + 1, -1, np.int64)
_ELEMENT_INDEX_BY_Z[list(ATOMIC_NUMBERS)] = np.arange(len(ATOMIC_NUMBERS))


class BondMethod(enum.IntEnum):
    """How the bonds of a molecule were found (stored per molecule in the QM9 cache)."""

    DETERMINE_BONDS = 0  # RDKit DetermineBonds, connect-the-dots connectivity: the normal case
    HUECKEL = 1  # the same with extended-Hueckel connectivity, after the first failed
    CONNECTIVITY_ONLY = 2  # bond orders could not be assigned: connectivity, all bonds single


def atomic_numbers_from(symbols_or_numbers) -> np.ndarray:
    """Atomic numbers ``[N]`` (int64) from element symbols ("C") or numbers (6).

    Only H, C, N, O, F are supported (the elements of QM9, which the model was trained on);
    anything else raises a ``ValueError`` naming the element and the atom.
    """
    items = list(np.asarray(symbols_or_numbers, dtype=object).reshape(-1))
    numbers = []
    for atom, item in enumerate(items):
        if isinstance(item, str):
            z = _Z_BY_SYMBOL.get(item.strip().capitalize())
        elif isinstance(item, (int, np.integer)) and not isinstance(item, bool):
            z = int(item) if int(item) in ATOMIC_NUMBERS else None
        elif isinstance(item, (float, np.floating)) and float(item).is_integer():
            z = int(item) if int(item) in ATOMIC_NUMBERS else None
        else:
            z = None
        if z is None:
            raise ValueError(
                f"unsupported element {item!r} (atom {atom}); supported elements are "
                f"{', '.join(ELEMENTS)} (atomic numbers {ATOMIC_NUMBERS})"
            )
        numbers.append(z)
    return np.asarray(numbers, np.int64)


def node_features(atomic_numbers) -> np.ndarray:
    """Node features ``[N, 6]`` float32: one-hot over H, C, N, O, F, then the atomic number."""
    z = np.asarray(atomic_numbers).astype(np.int64).reshape(-1)
    element_index = _ELEMENT_INDEX_BY_Z[np.clip(z, 0, len(_ELEMENT_INDEX_BY_Z) - 1)]
    if np.any(element_index < 0) or np.any(z >= len(_ELEMENT_INDEX_BY_Z)):
        atomic_numbers_from(z)  # raises with the offending element named
    features = np.zeros((len(z), NODE_FEATURES_DIM), np.float32)
    features[np.arange(len(z)), element_index] = 1.0
    features[:, -1] = z
    return features


def edge_features(bond_types) -> np.ndarray:
    """Edge features ``[E, 4]`` float32: one-hot of bond-type indices into ``BOND_TYPES``."""
    return np.eye(EDGE_FEATURES_DIM, dtype=np.float32)[np.asarray(bond_types, np.int64).reshape(-1)]


def validate_positions(positions, num_atoms: int | None = None) -> np.ndarray:
    """Positions as float64 ``[N, 3]``; a ``ValueError`` naming the problem otherwise."""
    positions = np.asarray(positions, np.float64)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape [N, 3], got {positions.shape}")
    if positions.shape[0] < 1:
        raise ValueError("a molecule needs at least one atom, got 0")
    if num_atoms is not None and positions.shape[0] != num_atoms:
        raise ValueError(f"{num_atoms} atoms but {positions.shape[0]} positions")
    bad = np.flatnonzero(~np.isfinite(positions).all(axis=1))
    if bad.size:
        raise ValueError(f"positions of atom(s) {bad[:10].tolist()} are NaN or infinite")
    if len(positions) > 1:
        d = np.linalg.norm(positions[:, None] - positions[None], axis=-1) + np.diag(np.full(len(positions), np.inf))
        i, j = np.unravel_index(np.argmin(d), d.shape)
        if d[i, j] < MIN_ATOM_DISTANCE:
            raise ValueError(
                f"atoms {min(i, j)} and {max(i, j)} are {d[i, j]:.3g} A apart, closer than "
                f"{MIN_ATOM_DISTANCE} A: coincident or nearly coincident atoms (a duplicated "
                f"line in the file?)"
            )
    return positions


def _rdkit_molecule(atomic_numbers: np.ndarray, positions: np.ndarray):
    """An RDKit molecule with atoms and one 3D conformer, and no bonds yet."""
    from rdkit import Chem
    from rdkit.Geometry import Point3D

    mol = Chem.RWMol()
    for z in atomic_numbers:
        atom = Chem.Atom(int(z))
        atom.SetNoImplicit(True)  # every hydrogen is explicit in an xyz file
        mol.AddAtom(atom)
    conformer = Chem.Conformer(len(atomic_numbers))
    for i, (x, y, z) in enumerate(positions):
        conformer.SetAtomPosition(i, Point3D(float(x), float(y), float(z)))
    mol.AddConformer(conformer, assignId=True)
    return mol


@contextlib.contextmanager
def _quiet_rdkit():
    """Silence RDKit's log and the C-level stderr of its extended-Hueckel code (YAeHMOP prints
    "Distance ... is suspicious" for ordinary O-H bonds); failures are reported by the caller."""
    from rdkit import rdBase

    blocker = rdBase.BlockLogs()
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError):
        saved = None
    try:
        if saved is not None:
            with open(os.devnull, "w") as devnull:
                os.dup2(devnull.fileno(), 2)
        yield
    finally:
        if saved is not None:
            os.dup2(saved, 2)
            os.close(saved)
        del blocker


def _bond_type_index(bond) -> int:
    from rdkit import Chem

    if bond.GetIsAromatic():
        return BOND_TYPES.index("aromatic")
    return {Chem.BondType.DOUBLE: 1, Chem.BondType.TRIPLE: 2, Chem.BondType.AROMATIC: 3}.get(bond.GetBondType(), 0)


def _kekulize(mol) -> None:
    """Alternating single/double bonds instead of aromatic ones: NVIDIA's reference reads QM9's
    SDF unsanitised (Kekule form, its aromatic column always 0), so the same model sees the
    same edge features. A ring RDKit cannot kekulize keeps its aromatic flags."""
    from rdkit import Chem

    try:
        Chem.Kekulize(mol, clearAromaticFlags=True)
    except Exception:  # RDKit raises KekulizeException for unkekulizable rings
        logger.warning("RDKit could not kekulize a molecule; its aromatic bonds stay aromatic")


def infer_bond_list(atomic_numbers, positions) -> tuple[np.ndarray, BondMethod]:
    """Undirected bonds ``[B, 3]`` int64 rows (i, j, bond-type index) with i < j, and how they
    were found. RDKit's ``DetermineBonds`` (charge 0) first, then with extended-Hueckel
    connectivity, then connectivity only (all single) -- a molecule is never dropped. Bond
    orders are in Kekule form (single/double/triple, as the reference's QM9 graphs)."""
    from rdkit.Chem import rdDetermineBonds

    z = np.asarray(atomic_numbers, np.int64).reshape(-1)
    positions = validate_positions(positions, len(z))
    if len(z) == 1:
        return np.zeros((0, 3), np.int64), BondMethod.DETERMINE_BONDS

    with _quiet_rdkit():
        for method, use_hueckel in ((BondMethod.DETERMINE_BONDS, False), (BondMethod.HUECKEL, True)):  # noqa: B007 (read after the loop)
            mol = _rdkit_molecule(z, positions)
            try:
                rdDetermineBonds.DetermineBonds(mol, charge=0, useHueckel=use_hueckel)
                break
            except Exception:  # RDKit raises ValueError/RuntimeError for unassignable orders
                pass
        else:
            method = BondMethod.CONNECTIVITY_ONLY
            mol = _rdkit_molecule(z, positions)
            rdDetermineBonds.DetermineConnectivity(mol, charge=0)

    if method != BondMethod.CONNECTIVITY_ONLY:
        _kekulize(mol)
    bonds = []
    for bond in mol.GetBonds():
        i, j = sorted((bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()))
        bond_type = 0 if method == BondMethod.CONNECTIVITY_ONLY else _bond_type_index(bond)
        bonds.append((i, j, bond_type))
    bonds = np.asarray(sorted(bonds), np.int64).reshape(-1, 3)
    return bonds, method


def directed_edges(bonds) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Both directions of undirected bonds ``[B, 3]`` (i, j, type): (senders, receivers,
    bond-type indices). Bonds are sorted by (i, j) for a deterministic order, and each bond's
    two directions are adjacent (edges 2k and 2k+1): the "paired edges" layout that lets the
    model compute the radial weights once per bond (:mod:`se3jax.graphs`)."""
    bonds = np.asarray(bonds, np.int64).reshape(-1, 3)
    bonds = bonds[np.lexsort((bonds[:, 1], bonds[:, 0]))]
    senders = np.stack([bonds[:, 0], bonds[:, 1]], axis=1).reshape(-1)
    receivers = np.stack([bonds[:, 1], bonds[:, 0]], axis=1).reshape(-1)
    types = np.repeat(bonds[:, 2], 2)
    return senders, receivers, types


def infer_bonds(atomic_numbers, positions):
    """Bonds of a molecule from its 3D structure, as directed edges.

    Returns ``(senders [E], receivers [E], edge_features [E, 4] one-hot, ok)`` where every bond
    appears in both directions and ``ok`` is False when bond orders could not be assigned (the
    edges are then the connectivity, all single bonds).
    """
    z = atomic_numbers_from(atomic_numbers)
    bonds, method = infer_bond_list(z, positions)
    senders, receivers, types = directed_edges(bonds)
    return senders, receivers, edge_features(types), method != BondMethod.CONNECTIVITY_ONLY


def _bonds_from_user(bonds, num_atoms: int) -> np.ndarray:
    """Validate user bonds ``[(i, j, type), ...]`` (type a name in ``BOND_TYPES`` or its
    index) into ``[B, 3]`` int64 rows with i < j."""
    rows = []
    for k, bond in enumerate(bonds):
        if len(bond) != 3:
            raise ValueError(f"bond {k} must be (i, j, type), got {bond!r}")
        i, j, bond_type = bond
        if isinstance(bond_type, str):
            if bond_type.lower() not in BOND_TYPES:
                raise ValueError(f"bond {k}: unknown bond type {bond_type!r}; use one of {BOND_TYPES}")
            bond_type = BOND_TYPES.index(bond_type.lower())
        elif not 0 <= int(bond_type) < len(BOND_TYPES):
            raise ValueError(f"bond {k}: bond type index {bond_type} not in [0, {len(BOND_TYPES)})")
        i, j = int(i), int(j)
        if not (0 <= i < num_atoms and 0 <= j < num_atoms) or i == j:
            raise ValueError(f"bond {k} ({i}, {j}) must join two different atoms in [0, {num_atoms})")
        rows.append((min(i, j), max(i, j), int(bond_type)))
    return np.asarray(rows, np.int64).reshape(-1, 3)


def molecule_to_graph(atomic_numbers, positions, bonds=None, target=None) -> jraph.GraphsTuple:
    """One molecule as an unpadded ``GraphsTuple`` (the se3jax graph conventions).

    ``atomic_numbers``: symbols or numbers of H, C, N, O, F; ``positions``: ``[N, 3]`` Angstrom.
    ``bonds``: optional ``[(i, j, type), ...]`` used instead of RDKit's inference.
    ``target``: optional scalar, stored as ``globals["target"]``.
    """
    z = atomic_numbers_from(atomic_numbers)
    if len(z) < 1:
        raise ValueError("a molecule needs at least one atom, got 0")
    positions = validate_positions(positions, len(z))
    if bonds is None:
        bond_rows, method = infer_bond_list(z, positions)
        if method == BondMethod.CONNECTIVITY_ONLY:
            logger.warning("RDKit could not assign bond orders; using connectivity with single bonds")
    else:
        bond_rows = _bonds_from_user(bonds, len(z))
    senders, receivers, types = directed_edges(bond_rows)
    globals_ = None if target is None else {TARGET: np.float32(target)}
    return molecule_graph(positions, node_features(z), senders, receivers, edge_features(types), globals_)
