"""Inference for other JAX pipelines: loading, composition (jit, vmap, grad), export, and the
predict command's handling of bad files."""

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax import host_memory, inference
from se3jax.graphs import POSITIONS, pad_to_budget
from se3jax.testing import methane, random_rotations, water
from se3jax.training.checkpoints import Checkpointer
from se3jax.training.train import build_model

# one xdist worker runs this module: its tests share module-level fixtures and caches
pytestmark = pytest.mark.xdist_group("test_inference")

REPO = Path(__file__).resolve().parents[1]
WATER, METHANE = water(), methane()


@pytest.fixture(scope="module")
def predictor(trained_workdir):
    return inference.load_predictor(trained_workdir, batch_size=8)


def test_loaded_predictor_matches_the_training_code(trained_workdir, predictor, qm9_subset):
    from se3jax.data.loader import budget_for

    ids = qm9_subset.splits["val"][:6]
    # the training code's view: restored train state, dataset batch, denormalised output
    config = json.loads((trained_workdir / "config.json").read_text())
    state, _ = Checkpointer(trained_workdir / "checkpoints").restore()
    batch = pad_to_budget(qm9_subset.batch_graphs(ids), budget_for(qm9_subset, ids, 8))
    import ml_collections

    model = build_model(ml_collections.ConfigDict(config))
    outputs = np.asarray(jax.jit(model.apply)(state["params"], batch))[:6]
    expected = qm9_subset.normalisation.to_unit(outputs, qm9_subset.element_counts[ids])
    # the user's view: atoms + positions from the dataset, bonds inferred again by the API
    molecules = []
    for i in ids:
        a0, a1 = qm9_subset.atom_offsets[i], qm9_subset.atom_offsets[i + 1]
        molecules.append((qm9_subset.atomic_numbers[a0:a1], qm9_subset.positions[a0:a1]))
    got = predictor.predict_molecules(molecules)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    assert predictor.unit == "eV" and predictor.task == "homo"


def test_predict_composes_with_jit_vmap_and_grad(predictor):
    graphs = inference.molecules_to_graphs([WATER, METHANE], predictor.budget)
    direct = predictor.jitted(predictor.params, graphs)

    @jax.jit
    def user_pipeline(params, graphs):  # a user's own jitted function calling the predictor
        return 2.0 * predictor.predict(params, graphs) + 1.0

    np.testing.assert_allclose(user_pipeline(predictor.params, graphs), 2 * direct + 1, rtol=1e-5)
    stacked = jax.tree.map(
        lambda a, b: jnp.stack([a, b]), graphs, inference.molecules_to_graphs([METHANE, WATER], predictor.budget)
    )
    # (under jit: op by op, vmap would compile every batched primitive on its own)
    batched = jax.jit(jax.vmap(predictor.predict, in_axes=(None, 0)))(predictor.params, stacked)
    np.testing.assert_allclose(batched[0, :2], direct[:2], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(batched[1, :2], direct[:2][::-1], rtol=1e-5, atol=1e-6)


def test_jitted_compiles_once_per_input_shape_before_its_first_call(predictor, monkeypatch):
    """Compiled ahead of the first call of each input shape, the compiler's freed memory handed
    back before the batch runs (peak RSS at batch 100: 0.95 -> 0.80 GB), then reused."""
    releases = []
    monkeypatch.setattr(host_memory, "release_freed_host_memory", lambda: releases.append(1))
    fresh = dataclasses.replace(predictor)  # its own jitted, never called yet
    graphs = inference.molecules_to_graphs([WATER, METHANE], predictor.budget)
    first = fresh.jitted(fresh.params, graphs)
    assert len(releases) == 1
    swapped = fresh.jitted(fresh.params, inference.molecules_to_graphs([METHANE, WATER], predictor.budget))
    assert len(releases) == 1  # same shapes: the same executable
    np.testing.assert_allclose(swapped[:2], first[:2][::-1], rtol=1e-6)
    smaller = fresh.jitted(fresh.params, inference.molecules_to_graphs([WATER], inference.budget_for_batch(2)))
    assert len(releases) == 2 and smaller.shape[0] < first.shape[0]
    np.testing.assert_allclose(smaller[0], first[0], rtol=1e-5)


def _forces(predictor, molecule, gradient):
    graphs = inference.molecules_to_graphs([molecule], predictor.budget)
    return np.asarray(gradient(predictor.params, graphs, jnp.asarray(graphs.nodes[POSITIONS])))[: len(molecule[0])]


def _energy_gradient(predictor):
    """d(prediction)/d(positions), one compiled function for every molecule of the budget."""

    def energy(params, graphs, positions):
        return predictor.predict(params, graphs._replace(nodes={**graphs.nodes, POSITIONS: positions}))[0]

    return jax.jit(jax.grad(energy, argnums=2))


def test_position_gradients_are_finite_and_rotate_with_the_molecule(predictor):
    # A distorted methane: at an exactly symmetric geometry some vector features vanish and
    # NormSE3's x/|x| makes the gradient ill-conditioned (rounding noise gets amplified).
    distorted = (METHANE[0], METHANE[1] + np.random.default_rng(3).normal(scale=0.05, size=(5, 3)))
    gradient = _energy_gradient(predictor)
    forces = _forces(predictor, distorted, gradient)
    assert np.all(np.isfinite(forces)) and np.abs(forces).max() > 0
    for rotation in random_rotations(np.random.default_rng(7), 3):
        rotated = _forces(predictor, (distorted[0], distorted[1] @ rotation.T), gradient)
        # float32 model: rotating the input rotates the gradient to ~1e-5 of its scale
        np.testing.assert_allclose(rotated, forces @ rotation.T, atol=2e-5 * np.abs(forces).max() + 1e-7)


def test_exported_artifact_reloads_and_gives_the_same_numbers(predictor, tmp_path):
    path = inference.export_predictor(predictor, tmp_path / "homo.jaxexport")
    loaded = inference.load_exported(path)
    graphs = inference.molecules_to_graphs([WATER, METHANE], loaded.budget)
    np.testing.assert_allclose(loaded(graphs), predictor.jitted(predictor.params, graphs), rtol=1e-6)
    assert loaded.unit == "eV" and json.loads(Path(str(path) + ".json").read_text())["task"] == "homo"


def test_predict_files_reports_bad_molecules_and_predicts_the_rest(predictor, tmp_path):
    good = tmp_path / "good.xyz"
    good.write_text(
        "3\nwater\nO 0 0 0\nH 0.9572 0 0\nH -0.24 0.9266 0\n"
        "5\nmethane\n" + "\n".join(f"{a} {x} {y} {z}" for a, (x, y, z) in zip(*METHANE)) + "\n"
    )
    unknown = tmp_path / "unknown.xyz"
    unknown.write_text("2\nHCl\nCl 0 0 0\nH 1.27 0 0\n3\nwater again\nO 0 0 0\nH 0.96 0 0\nH -0.24 0.93 0\n")
    malformed = tmp_path / "malformed.xyz"
    malformed.write_text("3\nbroken\nO 0 0 0\nH zero 0 0\nH 0 1 0\n")
    nan = tmp_path / "nan.xyz"
    nan.write_text("2\nnan\nH 0 0 0\nH nan 0 0\n")
    empty = tmp_path / "empty.xyz"
    empty.write_text("")
    big = tmp_path / "big.xyz"  # a 70-carbon chain: larger than the batch-size-1 budget
    big.write_text("70\nchain\n" + "\n".join(f"C {1.5 * k} 0 0" for k in range(70)) + "\n")
    predictions, errors = inference.predict_files(predictor, [good, unknown, malformed, nan, empty, big], batch_size=1)
    assert [p.name for p in predictions] == ["water", "methane", "water again"]
    messages = {Path(e.source).name: str(e) for e in errors}
    assert "molecule 1: unsupported element 'Cl'" in messages["unknown.xyz"]
    assert "malformed.xyz, molecule 1: line 4" in messages["malformed.xyz"]
    assert "nan.xyz, molecule 1" in messages["nan.xyz"] and "NaN" in messages["nan.xyz"]
    assert "empty" in messages["empty.xyz"]
    assert "exceed the padding budget" in messages["big.xyz"]
    reference = predictor.predict_molecules([WATER, METHANE])
    np.testing.assert_allclose([p.value for p in predictions[:2]], reference, rtol=1e-5)


def test_predict_command_writes_csv_and_json(trained_workdir, tmp_path):
    mols = tmp_path / "mols.xyz"
    mols.write_text("3\nwater\nO 0 0 0\nH 0.9572 0 0\nH -0.24 0.9266 0\n1\ncarbon atom\nC 0 0 0\n")
    bad = tmp_path / "bad.xyz"
    bad.write_text("1\nxenon\nXe 0 0 0\n")
    result = subprocess.run(
        [
            sys.executable,
            "scripts/predict.py",
            str(trained_workdir),
            str(mols),
            str(bad),
            "--csv",
            str(tmp_path / "out.csv"),
            "--json",
            str(tmp_path / "out.json"),
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 1, result.stderr  # one molecule failed, the other was predicted
    assert "bad.xyz, molecule 1: unsupported element 'Xe'" in result.stderr
    assert "water" in (tmp_path / "out.csv").read_text()
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["unit"] == "eV" and len(data["predictions"]) == 2 and len(data["errors"]) == 1
    water_row, carbon_row = data["predictions"]
    assert water_row["warnings"] == [] and "fewer than the smallest training molecule" in carbon_row["warnings"][0]
    table = dict(line.split(maxsplit=1) for line in result.stdout.splitlines()[1:])  # name -> rest of the row
    assert "fewer than the smallest" in table["carbon"] and "fewer" not in table["water"]
    assert "fewer than the smallest" in (tmp_path / "out.csv").read_text()


def alkane(num_carbons: int):
    """An all-anti CnH(2n+2) chain (C-C 1.53 A, C-H 1.09 A, tetrahedral angles)."""
    half = np.radians(109.47 / 2)
    dx, dy = 1.53 * np.sin(half), 1.53 * np.cos(half)
    carbons = [np.array([k * dx, (k % 2) * dy, 0.0]) for k in range(num_carbons)]
    atoms, positions = ["C"] * num_carbons, list(carbons)
    for k, c in enumerate(carbons):
        away = -1.0 if k % 2 == 0 else 1.0  # y direction away from both neighbours
        hydrogens = [(0.0, away * np.cos(half), side * np.sin(half)) for side in (1.0, -1.0)]
        if k in (0, num_carbons - 1):  # chain ends: a third hydrogen continuing the zigzag
            hydrogens.append((dx if k else -dx, -away * dy, 0.0))
        for d in hydrogens:
            atoms.append("H")
            positions.append(c + 1.09 * np.asarray(d) / np.linalg.norm(d))
    return atoms, np.array(positions)


def test_molecules_outside_the_training_domain_are_predicted_with_warnings(predictor, qm9_subset, caplog):
    """A lone carbon atom and a 59-atom alkane (twice QM9's largest molecule) get warnings and
    still a number; a molecule the model trained on gets none."""
    domain = predictor.domain
    assert domain is not None and domain.max_atoms <= 29  # saved by training (trained_workdir)
    train = qm9_subset.splits["train"][:32]  # the molecules trained_workdir trained on
    i = train[np.argmax(qm9_subset.num_nodes[train])]
    a0, a1 = qm9_subset.atom_offsets[i], qm9_subset.atom_offsets[i + 1]
    trained_on = (qm9_subset.atomic_numbers[a0:a1], qm9_subset.positions[a0:a1])
    carbon, chain = (["C"], [[0.0, 0.0, 0.0]]), alkane(19)
    assert len(chain[0]) == 59
    warnings = predictor.domain_warnings([carbon, chain, trained_on])
    assert any("1 atom: fewer than the smallest training molecule" in w for w in warnings[0]), warnings[0]
    assert f"59 atoms: more than the largest training molecule ({domain.max_atoms} atoms)" in warnings[1]
    assert warnings[2] == []
    with caplog.at_level("WARNING"):
        values = predictor.predict_molecules([carbon, chain, trained_on])
    assert np.all(np.isfinite(values))
    assert any("2 of 3 molecules lie outside the training domain" in r.getMessage() for r in caplog.records)


def test_missing_workdir_and_checkpoint_give_clear_errors(tmp_path, trained_workdir):
    with pytest.raises(FileNotFoundError, match="is .* a training workdir"):
        inference.load_predictor(tmp_path)
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "normalisation.json"):
        (copy / name).write_text((trained_workdir / name).read_text())
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        inference.load_predictor(copy)
