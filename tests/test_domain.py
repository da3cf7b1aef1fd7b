"""The training domain: what a model's training molecules span, and the warnings outside it."""

import json

import numpy as np

from se3jax.data.domain import TrainingDomain, bond_patterns
from se3jax.data.molecules import BOND_TYPES, molecule_to_graph
from se3jax.testing import methane, water


def test_domain_of_molecules_matches_a_direct_count(qm9_subset):
    ids = qm9_subset.splits["train"][:50]
    domain = TrainingDomain.of_molecules(qm9_subset, ids)
    sizes = qm9_subset.num_nodes[ids]
    assert (domain.max_atoms, domain.min_atoms) == (sizes.max(), sizes.min())
    patterns, heavy, elements = set(), [], set()
    for i in ids:
        g = qm9_subset.graph(i)
        z = g.nodes["features"][:, -1].astype(int)
        heavy.append(int((z > 1).sum()))
        elements |= set(z.tolist())
        for s, r, t in zip(g.senders, g.receivers, g.edges["features"].argmax(-1)):
            patterns.add((min(z[s], z[r]), max(z[s], z[r]), int(t)))
    assert domain.min_heavy_atoms == min(heavy) and set(domain.elements) == elements
    assert set(domain.bond_patterns) == patterns
    assert TrainingDomain.from_json(json.loads(json.dumps(domain.to_json()))) == domain


def test_each_rule_warns_outside_and_is_silent_inside():
    domain = TrainingDomain(
        max_atoms=5, min_atoms=3, min_heavy_atoms=1, elements=(1, 6, 8), bond_patterns=((1, 6, 0), (1, 8, 0))
    )
    check = lambda molecule: domain.check_graph(molecule_to_graph(*molecule))
    assert check(water()) == [] and check(methane()) == []
    assert check((["H", "H", "H"], [[0, 0, 0], [0.74, 0, 0], [5, 0, 0]])) == [
        "0 heavy atoms: fewer than any training molecule (1)",
        "bond(s) never seen in training: H-H single",
    ]
    ethene = (["C", "C", "H", "H", "H", "H"], [[0, 0, 0], [1.33, 0, 0], [-0.56, 0.93, 0], [-0.56, -0.93, 0],
                                               [1.89, 0.93, 0], [1.89, -0.93, 0]])  # fmt: skip
    assert check(ethene) == [
        "6 atoms: more than the largest training molecule (5 atoms)",
        "bond(s) never seen in training: C-C double",
    ]
    assert check(
        (["N", "H", "H", "H"], [[0, 0, 0.1], [0.94, 0, -0.27], [-0.47, 0.81, -0.27], [-0.47, -0.81, -0.27]])
    ) == [
        "element(s) never seen in training: N",
        "bond(s) never seen in training: H-N single",
    ]


def test_bond_patterns_ignore_direction():
    rows = bond_patterns([8, 1], [0, 1], [1, 0], [0, 0])
    np.testing.assert_array_equal(rows, [[1, 8, 0], [1, 8, 0]])
    assert BOND_TYPES[rows[0, 2]] == "single"
