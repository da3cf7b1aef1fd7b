"""What a trained model has seen: the size range, elements and bond patterns of its training
molecules, and the warnings for a molecule outside them.

A prediction for such a molecule is an extrapolation -- more atoms than the largest training
molecule (29 in QM9), fewer atoms or heavy atoms than the smallest, an element or a bonded pair
(element, element, bond order) that never occurred. The number may still be wanted, so it
comes with warnings, not an error. Training saves the domain of the molecules it trained on in
the workdir (``training_domain.json``); inference checks every molecule against it.

>>> domain = TrainingDomain(max_atoms=5, min_atoms=3, min_heavy_atoms=1, elements=(1, 6),
...                         bond_patterns=((1, 6, 0),))
>>> domain.check([6], [], [], [])
['1 atom: fewer than the smallest training molecule (3 atoms)']
"""

from __future__ import annotations

import dataclasses

import jraph
import numpy as np

from se3jax.data.molecules import ATOMIC_NUMBERS, BOND_TYPES, ELEMENTS
from se3jax.graphs import FEATURES

_SYMBOL = dict(zip(ATOMIC_NUMBERS, ELEMENTS))


def _plural(count: int, noun: str) -> str:
    return f"{count} {noun}" + ("" if count == 1 else "s")


def _pattern_name(pattern) -> str:
    a, b, bond = (int(x) for x in pattern)
    return f"{_SYMBOL.get(a, a)}-{_SYMBOL.get(b, b)} {BOND_TYPES[bond]}"


def bond_patterns(atomic_numbers, senders, receivers, bond_types) -> np.ndarray:
    """The (smaller Z, larger Z, bond-type index) of every edge ``[E, 3]`` (both directions of
    a bond give the same row)."""
    z = np.asarray(atomic_numbers, np.int64).reshape(-1)
    a, b = z[np.asarray(senders, np.int64)], z[np.asarray(receivers, np.int64)]
    return np.stack([np.minimum(a, b), np.maximum(a, b), np.asarray(bond_types, np.int64).reshape(-1)], 1)


@dataclasses.dataclass(frozen=True)
class TrainingDomain:
    """Sizes, elements (atomic numbers) and bond patterns ``(Z, Z', bond type)`` with ``Z <= Z'``
    of a model's training molecules."""

    max_atoms: int
    min_atoms: int
    min_heavy_atoms: int
    elements: tuple[int, ...]
    bond_patterns: tuple[tuple[int, int, int], ...]

    @classmethod
    def of_molecules(cls, dataset, indices) -> TrainingDomain:
        """The domain of ``dataset``'s molecules ``indices`` (a :class:`~se3jax.data.qm9.QM9Dataset`
        or anything with its offsets and arrays)."""
        graphs = dataset.batch_graphs(np.asarray(indices, np.int64), normalised=False)
        z = _atomic_numbers(graphs)
        heavy = np.add.reduceat((z > 1).astype(np.int64), np.cumsum(graphs.n_node) - graphs.n_node)
        patterns = bond_patterns(z, graphs.senders, graphs.receivers, _bond_types(graphs))
        return cls(
            max_atoms=int(graphs.n_node.max()),
            min_atoms=int(graphs.n_node.min()),
            min_heavy_atoms=int(heavy.min()),
            elements=tuple(int(e) for e in np.unique(z)),
            bond_patterns=tuple(tuple(int(v) for v in row) for row in np.unique(patterns, axis=0)),
        )

    def check(self, atomic_numbers, senders, receivers, bond_types) -> list[str]:
        """Warnings for one molecule (empty inside the domain): its atomic numbers ``[N]`` and
        its directed edges with bond-type indices."""
        z = np.asarray(atomic_numbers, np.int64).reshape(-1)
        warnings = []
        if len(z) > self.max_atoms:
            warnings.append(
                f"{_plural(len(z), 'atom')}: more than the largest training molecule ({self.max_atoms} atoms)"
            )
        if len(z) < self.min_atoms:
            warnings.append(
                f"{_plural(len(z), 'atom')}: fewer than the smallest training molecule ({self.min_atoms} atoms)"
            )
        heavy = int(np.sum(z > 1))
        if heavy < self.min_heavy_atoms:
            warnings.append(
                f"{_plural(heavy, 'heavy atom')}: fewer than any training molecule ({self.min_heavy_atoms})"
            )
        unseen = sorted(set(z.tolist()) - set(self.elements))
        if unseen:
            names = ", ".join(_SYMBOL.get(e, str(e)) for e in unseen)
            warnings.append(f"element(s) never seen in training: {names}")
        patterns = {tuple(row) for row in bond_patterns(z, senders, receivers, bond_types).tolist()}
        unseen = sorted(patterns - set(self.bond_patterns))
        if unseen:
            warnings.append(f"bond(s) never seen in training: {', '.join(map(_pattern_name, unseen))}")
        return warnings

    def check_graph(self, graph: jraph.GraphsTuple) -> list[str]:
        """Warnings for one molecule as an unpadded GraphsTuple (se3jax's node and edge
        features: the atomic number is the last node feature, the bond type one-hot)."""
        return self.check(_atomic_numbers(graph), graph.senders, graph.receivers, _bond_types(graph))

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainingDomain:
        return cls(
            max_atoms=int(data["max_atoms"]),
            min_atoms=int(data["min_atoms"]),
            min_heavy_atoms=int(data["min_heavy_atoms"]),
            elements=tuple(int(e) for e in data["elements"]),
            bond_patterns=tuple(tuple(int(v) for v in p) for p in data["bond_patterns"]),
        )


def _atomic_numbers(graph: jraph.GraphsTuple) -> np.ndarray:
    return np.rint(np.asarray(graph.nodes[FEATURES])[:, -1]).astype(np.int64)


def _bond_types(graph: jraph.GraphsTuple) -> np.ndarray:
    return np.argmax(np.asarray(graph.edges[FEATURES]), axis=-1)
