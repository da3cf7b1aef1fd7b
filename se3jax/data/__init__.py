"""QM9 data: molecules -> bond graphs (``molecules``), the cached dataset and its splits
(``qm9``), and padded training batches (``loader``)."""

from se3jax.data.loader import BackgroundIterator, BatchLoader, budget_for, pack_batches
from se3jax.data.molecules import (
    ATOMIC_NUMBERS,
    BOND_TYPES,
    EDGE_FEATURES_DIM,
    ELEMENTS,
    NODE_FEATURES_DIM,
    BondMethod,
    atomic_numbers_from,
    edge_features,
    infer_bonds,
    molecule_to_graph,
    node_features,
)
from se3jax.data.qm9 import (
    DEFAULT_CACHE_DIR,
    HARTREE_TO_EV,
    SPLIT_SEED,
    TARGETS,
    QM9Dataset,
    load_qm9,
    split_indices,
    split_sizes,
)

__all__ = [
    "ATOMIC_NUMBERS",
    "BOND_TYPES",
    "EDGE_FEATURES_DIM",
    "ELEMENTS",
    "NODE_FEATURES_DIM",
    "BondMethod",
    "atomic_numbers_from",
    "edge_features",
    "infer_bonds",
    "molecule_to_graph",
    "node_features",
    "DEFAULT_CACHE_DIR",
    "HARTREE_TO_EV",
    "SPLIT_SEED",
    "TARGETS",
    "QM9Dataset",
    "load_qm9",
    "split_indices",
    "split_sizes",
    "BackgroundIterator",
    "BatchLoader",
    "budget_for",
    "pack_batches",
]
