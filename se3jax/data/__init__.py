"""QM9 data: molecules -> bond graphs (``molecules``); QM9's CSVs read and bonds perceived
(``qm9_source``), the processed arrays cached on disk (``qm9_cache``), the dataset with its
splits and normalisation (``qm9``); padded training batches (``loader``); what a trained model
has seen (``domain``)."""

from se3jax.data.loader import BackgroundIterator, BatchLoader, budget_for, pack_batches, precompute_edge_harmonics
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
    "precompute_edge_harmonics",
]
