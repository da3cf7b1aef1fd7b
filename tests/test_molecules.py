"""Molecules -> bond graphs: bond inference, features, validation."""

import sys

import numpy as np
import pytest
from rdkit.Chem import rdDetermineBonds

from se3jax.data import molecules
from se3jax.data.molecules import (
    BOND_TYPES,
    EDGE_FEATURES_DIM,
    NODE_FEATURES_DIM,
    atomic_numbers_from,
    infer_bonds,
    molecule_to_graph,
    node_features,
)
from se3jax.testing import benzene, methane, water

SINGLE, DOUBLE, TRIPLE, AROMATIC = np.eye(4, dtype=np.float32)


def edge_set(senders, receivers, features):
    return {(int(s), int(r), BOND_TYPES[int(np.argmax(f))]) for s, r, f in zip(senders, receivers, features)}


def test_benzene_is_kekulized_alternating_single_and_double_ring_bonds():
    """The reference's QM9 graphs are in Kekule form (aromatic column always 0): so are ours."""
    senders, receivers, features, ok = infer_bonds(*benzene())
    assert ok
    assert features.shape == (24, EDGE_FEATURES_DIM) and features.dtype == np.float32
    edges = edge_set(senders, receivers, features)
    ring = [(i, (i + 1) % 6) for i in range(6)]
    ring_types = [next(t for s, r, t in edges if (s, r) == bond) for bond in ring]
    assert ring_types in (["single", "double"] * 3, ["double", "single"] * 3), ring_types
    ch = {(i, i + 6, "single") for i in range(6)} | {(i + 6, i, "single") for i in range(6)}
    assert ch <= edges
    np.testing.assert_array_equal(features.sum(0), [18, 6, 0, 0])  # no aromatic bond


def test_methane_has_four_single_bonds_in_both_directions():
    senders, receivers, features, ok = infer_bonds(*methane())
    assert ok
    assert edge_set(senders, receivers, features) == (
        {(0, h, "single") for h in range(1, 5)} | {(h, 0, "single") for h in range(1, 5)}
    )


def test_water_has_two_single_bonds():
    senders, receivers, features, ok = infer_bonds(*water())
    assert ok
    assert edge_set(senders, receivers, features) == {
        (0, 1, "single"),
        (0, 2, "single"),
        (1, 0, "single"),
        (2, 0, "single"),
    }


def test_hydrogen_cyanide_has_a_triple_bond():
    senders, receivers, features, _ = infer_bonds(["H", "C", "N"], [[-1.07, 0, 0], [0, 0, 0], [1.16, 0, 0]])
    assert edge_set(senders, receivers, features) == {
        (0, 1, "single"),
        (1, 0, "single"),
        (1, 2, "triple"),
        (2, 1, "triple"),
    }


def test_single_atom_has_no_edges():
    senders, receivers, features, ok = infer_bonds(["C"], [[0.0, 0.0, 0.0]])
    assert ok and len(senders) == len(receivers) == 0 and features.shape == (0, 4)
    graph = molecule_to_graph([8], [[1.0, 2.0, 3.0]])
    assert graph.nodes["features"].shape == (1, NODE_FEATURES_DIM)
    assert graph.edges["features"].shape == (0, EDGE_FEATURES_DIM)
    np.testing.assert_array_equal(graph.n_edge, [0])


def test_failed_bond_orders_fall_back_to_single_bond_connectivity(monkeypatch):
    from rdkit.Chem import rdDetermineBonds

    def fail(*args, **kwargs):
        raise ValueError("cannot assign bond orders")

    monkeypatch.setattr(rdDetermineBonds, "DetermineBonds", fail)
    senders, receivers, features, ok = infer_bonds(*benzene())
    assert not ok
    assert len(senders) == 24
    np.testing.assert_array_equal(features, np.tile(SINGLE, (24, 1)))


def test_node_features_are_one_hot_elements_then_atomic_number():
    features = node_features([1, 6, 7, 8, 9, 6])
    expected = np.concatenate([np.eye(5)[[0, 1, 2, 3, 4, 1]], [[1], [6], [7], [8], [9], [6]]], axis=1)
    np.testing.assert_array_equal(features, expected)
    assert features.dtype == np.float32


def test_atomic_numbers_from_symbols_and_numbers():
    np.testing.assert_array_equal(atomic_numbers_from(["H", "C", "N", "O", "F"]), [1, 6, 7, 8, 9])
    np.testing.assert_array_equal(atomic_numbers_from(np.array([6, 1], np.uint8)), [6, 1])


@pytest.mark.parametrize("bad, named", [(["C", "Cl"], "'Cl'"), ([6, 17], "17"), (["Xx"], "'Xx'"), ([6.5], "6.5")])
def test_unknown_element_raises_naming_it(bad, named):
    with pytest.raises(ValueError, match=f"unsupported element {named}"):
        atomic_numbers_from(bad)
    with pytest.raises(ValueError, match="unsupported element"):
        molecule_to_graph(bad, np.zeros((len(bad), 3)))


def test_bad_positions_raise_clear_errors():
    symbols, positions = water()
    nan_positions = np.array(positions, float)
    nan_positions[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"atom\(s\) \[1\] are NaN or infinite"):
        molecule_to_graph(symbols, nan_positions)
    with pytest.raises(ValueError, match=r"shape \[N, 3\]"):
        molecule_to_graph(symbols, np.zeros((3, 2)))
    with pytest.raises(ValueError, match="3 atoms but 2 positions"):
        molecule_to_graph(symbols, np.zeros((2, 3)))
    with pytest.raises(ValueError, match="at least one atom"):
        molecule_to_graph([], np.zeros((0, 3)))


def test_molecule_to_graph_follows_graph_conventions():
    symbols, positions = water()
    graph = molecule_to_graph(symbols, positions, target=-0.5)
    np.testing.assert_allclose(graph.nodes["positions"], positions, rtol=1e-6)
    assert graph.nodes["positions"].dtype == np.float32
    np.testing.assert_array_equal(graph.nodes["features"], node_features([8, 1, 1]))
    np.testing.assert_array_equal(graph.senders, [0, 1, 0, 2])  # paired: bond directions adjacent
    np.testing.assert_array_equal(graph.receivers, [1, 0, 2, 0])
    assert graph.senders.dtype == np.int32
    np.testing.assert_array_equal(graph.n_node, [3])
    np.testing.assert_array_equal(graph.n_edge, [4])
    np.testing.assert_array_equal(graph.globals["target"], np.float32([-0.5]))


def test_explicit_bonds_replace_inference():
    symbols, positions = water()
    graph = molecule_to_graph(symbols, positions, bonds=[(1, 0, "double"), (0, 2, 0)])
    assert edge_set(graph.senders, graph.receivers, graph.edges["features"]) == {
        (0, 1, "double"),
        (1, 0, "double"),
        (0, 2, "single"),
        (2, 0, "single"),
    }
    with pytest.raises(ValueError, match="unknown bond type 'quadruple'"):
        molecule_to_graph(symbols, positions, bonds=[(0, 1, "quadruple")])
    with pytest.raises(ValueError, match=r"bond 0 \(0, 3\)"):
        molecule_to_graph(symbols, positions, bonds=[(0, 3, "single")])


def test_rdkit_noise_is_silenced_but_stderr_is_restored(capfd):
    """A hydroxyl radical has no valid bond orders, so bond inference falls back to RDKit's
    extended-Hueckel code, whose C library prints a warning for the ordinary O-H distance."""
    z, positions = [8, 1], np.array([[0.0, 0.0, 0.0], [0.97, 0.0, 0.0]])
    unsilenced = molecules._rdkit_molecule(np.array(z), positions)
    with pytest.raises(ValueError):
        rdDetermineBonds.DetermineBonds(unsilenced, charge=0, useHueckel=True)
    assert "is suspicious" in capfd.readouterr().err  # the noise that would reach the user

    bonds, method = molecules.infer_bond_list(z, positions)
    assert method == molecules.BondMethod.CONNECTIVITY_ONLY and bonds.tolist() == [[0, 1, 0]]
    print("still here", file=sys.stderr)
    print("stdout too")
    captured = capfd.readouterr()
    assert captured.err == "still here\n" and captured.out == "stdout too\n"


def test_directed_edges_put_each_bonds_two_directions_side_by_side():
    from se3jax.data.molecules import directed_edges

    senders, receivers, types = directed_edges([(0, 2, 1), (0, 1, 0)])
    assert senders.tolist() == [0, 1, 0, 2] and receivers.tolist() == [1, 0, 2, 0]
    assert types.tolist() == [0, 0, 1, 1]
