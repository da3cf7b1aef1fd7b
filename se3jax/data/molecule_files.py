"""Read molecules from .xyz (one or many concatenated) and .sdf files.

Every molecule comes back as a :class:`MoleculeRecord` or, if it is unusable, a
:class:`MoleculeError` naming the file and the molecule, so one bad molecule never stops the
others. Bonds are not read from the files: they are inferred from the geometry exactly as for
the training data.

>>> import tempfile, os
>>> path = os.path.join(tempfile.mkdtemp(), "water.xyz")
>>> _ = open(path, "w").write("3\\nwater\\nO 0 0 0\\nH 0.96 0 0\\nH -0.24 0.93 0\\n")
>>> [(r.name, r.atoms) for r in read_molecules(path)]
[('water', ['O', 'H', 'H'])]
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from se3jax.data.molecules import atomic_numbers_from, validate_positions


@dataclasses.dataclass
class MoleculeRecord:
    source: str  # file path
    index: int  # 0-based position of the molecule in its file
    name: str  # the comment line (xyz) or molecule name (sdf), else "file#index"
    atoms: list
    positions: np.ndarray


@dataclasses.dataclass
class MoleculeError:
    source: str
    index: int
    message: str

    def __str__(self) -> str:
        return f"{self.source}, molecule {self.index + 1}: {self.message}"


def _float(text: str) -> float:
    return float(text.replace("*^", "e"))  # QM9's original files write 1.2*^-6


def _check_molecule(source: str, index: int, name: str, atoms, positions):
    """A record if the atoms are supported and coordinates finite, else an error."""
    try:
        atomic_numbers_from(atoms)
        positions = validate_positions(positions, len(atoms))
    except ValueError as err:
        return MoleculeError(source, index, str(err))
    return MoleculeRecord(source, index, name or f"{Path(source).name}#{index + 1}", list(atoms), positions)


def read_xyz(path: str | Path) -> Iterator[MoleculeRecord | MoleculeError]:
    """Molecules of an XYZ file: blocks of ``count``, a comment, ``count`` lines
    ``Element x y z [extra columns]``. A malformed block ends the file's reading with an
    error (the following lines cannot be trusted); molecules before it are kept."""
    source = str(path)
    lines = Path(path).read_text().splitlines()
    pos, index = 0, 0
    while pos < len(lines):
        if not lines[pos].strip():
            pos += 1
            continue
        try:
            count = int(lines[pos].split()[0])
            if count < 1:
                raise ValueError
        except ValueError:
            yield MoleculeError(source, index, f"line {pos + 1}: expected an atom count, got {lines[pos]!r}")
            return
        block = lines[pos + 2 : pos + 2 + count]
        if len(block) < count:
            yield MoleculeError(source, index, f"file ends after {len(block)} of {count} atom lines")
            return
        atoms, coords = [], []
        try:
            for k, line in enumerate(block):
                parts = line.split()
                if len(parts) < 4:
                    raise ValueError(f"line {pos + 3 + k}: expected 'Element x y z', got {line!r}")
                atoms.append(int(parts[0]) if parts[0].isdigit() else parts[0])
                coords.append([_float(v) for v in parts[1:4]])
        except ValueError as err:
            message = str(err) if str(err).startswith("line") else f"line {pos + 3 + k}: bad coordinate in {line!r}"
            yield MoleculeError(source, index, message)
            return
        name = lines[pos + 1].strip() if pos + 1 < len(lines) else ""
        yield _check_molecule(source, index, name, atoms, np.asarray(coords, np.float64))
        pos += 2 + count
        index += 1


def read_sdf(path: str | Path) -> Iterator[MoleculeRecord | MoleculeError]:
    """Molecules of an SDF file (coordinates and elements; hydrogens kept as given)."""
    from rdkit import Chem, RDLogger

    RDLogger.DisableLog("rdApp.*")
    source = str(path)
    supplier = Chem.SDMolSupplier(source, removeHs=False, sanitize=False)
    for index, mol in enumerate(supplier):
        if mol is None or mol.GetNumConformers() == 0:
            yield MoleculeError(source, index, "unreadable SDF record (no atoms or coordinates)")
            continue
        atoms = [a.GetSymbol() for a in mol.GetAtoms()]
        positions = np.asarray(mol.GetConformer().GetPositions(), np.float64)
        name = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
        yield _check_molecule(source, index, name, atoms, positions)


def read_molecules(path: str | Path) -> Iterator[MoleculeRecord | MoleculeError]:
    """Records and errors of a .xyz or .sdf file; an empty or unknown file gives one error."""
    path = Path(path)
    readers = {".xyz": read_xyz, ".sdf": read_sdf}
    if path.suffix.lower() not in readers:
        yield MoleculeError(str(path), 0, f"unsupported file type {path.suffix!r}; use .xyz or .sdf")
        return
    if not path.exists():
        yield MoleculeError(str(path), 0, "file not found")
        return
    count = 0
    for item in readers[path.suffix.lower()](path):
        count += 1
        yield item
    if count == 0:
        yield MoleculeError(str(path), 0, "no molecules in file (empty)")
