"""Use a trained model from your own JAX code, or export it.

    from se3jax import inference
    predictor = inference.load_predictor("runs/qm9")               # a training workdir
    graphs = inference.molecules_to_graphs([(["O", "H", "H"], positions)], predictor.budget)
    energies = predictor.predict(predictor.params, graphs)          # [G] in predictor.unit

``predictor.predict(params, graphs)`` is a pure function: call it inside your ``jax.jit``,
``jax.vmap`` it over stacked padded batches, or differentiate it; ``jax.grad`` with respect to
``graphs.nodes["positions"]`` gives force-like gradients, since the bases are computed from
positions inside the model. ``export_predictor`` serialises the compiled function with
``jax.export`` for pipelines that do not have the Python model code.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import jraph
import ml_collections
import numpy as np
from tqdm import tqdm

from se3jax.data.domain import TrainingDomain
from se3jax.data.loader import pack_batches
from se3jax.data.molecule_files import MoleculeError, read_molecules
from se3jax.data.molecules import molecule_to_graph, node_features
from se3jax.data.qm9 import QM9_SIZES, Normalisation
from se3jax.graphs import (
    FEATURES,
    POSITIONS,
    PaddingBudget,
    graphs_tuple,
    molecule_graph,
    node_graph_index,
    pad_to_budget,
    padding_masks,
    validate_graphs,
)
from se3jax.host_memory import compile_and_release
from se3jax.layers.pooling import SMOOTH_POOLINGS
from se3jax.model import SE3TransformerPooled
from se3jax.training.checkpoints import Checkpointer, CheckpointError
from se3jax.training.config import model_kwargs
from se3jax.training.loop import input_signature
from se3jax.training.workdir import CHECKPOINT_DIR, CONFIG_FILE, DOMAIN_FILE, NORMALISATION_FILE

logger = logging.getLogger(__name__)


def budget_for_batch(batch_size: int, **sizes) -> PaddingBudget:
    """The padding budget for ``batch_size`` molecules (QM9-sized unless ``sizes`` say
    otherwise: mean_nodes, mean_edges, max_nodes, max_edges)."""
    return PaddingBudget.for_batch(batch_size, **{**QM9_SIZES, **sizes})


@dataclasses.dataclass(frozen=True)
class Predictor:
    """A trained model: parameters, the pure ``predict`` function and its target's unit."""

    model: SE3TransformerPooled
    params: Any
    normalisation: Normalisation
    budget: PaddingBudget
    domain: TrainingDomain | None = None  # the training molecules' range (None: not recorded)

    @property
    def task(self) -> str:
        return self.normalisation.task

    @property
    def unit(self) -> str:
        return self.normalisation.unit

    def predict(self, params, graphs: jraph.GraphsTuple) -> jax.Array:
        """Predictions ``[G]`` in the target's unit for padded ``graphs`` (padding graphs: 0).
        Pure and traceable: safe under jit, vmap and grad. Inside ``jit`` only shapes and
        dtypes are checked; :meth:`predict_molecules` checks values on the host first."""
        masks = padding_masks(graphs)
        norm = self.normalisation
        out = self.model.apply(params, graphs) * norm.std + norm.mean
        if norm.atom_reference:  # extensive targets: add the atoms' reference values
            z = jnp.asarray(graphs.nodes[FEATURES])[:, -1].astype(jnp.int32)  # the atomic number
            per_atom = jnp.where(masks.nodes, jnp.asarray(norm.reference_table(), out.dtype)[z], 0.0)
            out = out + jax.ops.segment_sum(per_atom, node_graph_index(graphs), out.shape[0])
        return jnp.where(masks.graphs, out, 0.0)

    @property
    def smooth_gradients(self) -> bool:
        """Whether predictions are smooth in the positions. With max pooling (the HOMO recipe)
        they are not: where symmetry-equivalent atoms tie for the maximum, rounding picks one
        and the gradient jumps (by ~100% under a rotation of such a molecule) while the
        prediction stays invariant. Sum, mean and softmax pooling are smooth."""
        return self.model.pooling in SMOOTH_POOLINGS

    def forces(self, params, graphs: jraph.GraphsTuple) -> jax.Array:
        """``-d(prediction of each graph) / d(positions)`` per node ``[N, 3]`` (eV/A for an energy
        recipe such as configs/qm9_energy.py). Pure and traceable. Refuses a max-pooled model,
        whose gradients are ill-defined (:attr:`smooth_gradients`)."""
        if not self.smooth_gradients:
            raise ValueError(
                f"this model pools with {self.model.pooling!r}: its gradients jump between "
                f"symmetry-equivalent atoms; train with pooling='sum' (configs/qm9_energy.py), "
                f"'mean' or 'softmax' for forces"
            )

        def total(positions):
            return jnp.sum(self.predict(params, graphs._replace(nodes={**graphs.nodes, POSITIONS: positions})))

        return -jax.grad(total)(graphs.nodes[POSITIONS])

    @functools.cached_property
    def jitted(self) -> Callable:
        """``jax.jit(predict)`` after the host's value checks (finite positions, edge indices,
        paired edges: a compiled step cannot raise), compiled once per shape of its inputs
        (per padding budget), ahead of its first call (:func:`compile_and_release`)."""
        jitted, executables = jax.jit(self.predict), {}
        model = self.model

        def checked(params, graphs: jraph.GraphsTuple) -> jax.Array:
            validate_graphs(graphs, model.node_features_dim, model.edge_features_dim, model.execution.paired_edges)
            key = input_signature((params, graphs))
            if key not in executables:
                executables[key] = compile_and_release(jitted, params, graphs)
            return executables[key](params, graphs)

        return checked

    def predict_molecules(
        self, molecules: Sequence, batch_size: int | None = None, progress: Callable | None = None
    ) -> np.ndarray:
        """Predict a list of molecules (GraphsTuples from :func:`molecules_to_graphs`' input
        format, i.e. ``(atoms, positions)`` or ``(atoms, positions, bonds)``, or unpadded
        GraphsTuples) in padded batches. Returns ``[M]`` in the target's unit."""
        graphs = [_as_graph(m) for m in molecules]
        outside = sum(bool(w) for w in self.domain_warnings(graphs))
        if outside:
            logger.warning(
                "%d of %d molecules lie outside the training domain: their predictions are extrapolations "
                "(Predictor.domain_warnings says why)",
                outside,
                len(graphs),
            )
        budget = self.budget if batch_size is None else budget_for_batch(batch_size)
        batches = pack_batches(
            [int(g.n_node[0]) for g in graphs],
            [int(g.n_edge[0]) for g in graphs],
            np.arange(len(graphs)),
            budget.n_graph - 1,
            budget,
        )
        out = np.zeros(len(graphs), np.float64)
        for idx in batches:
            padded = pad_to_budget([graphs[i] for i in idx], budget)
            out[idx] = np.asarray(self.jitted(self.params, padded))[: len(idx)]  # jitted checks it first
            if progress is not None:
                progress(len(idx))
        return out

    def domain_warnings(self, molecules: Sequence) -> list[list[str]]:
        """Per molecule (as :meth:`predict_molecules` takes them), why its prediction is an
        extrapolation: more atoms than the largest training molecule, fewer atoms or heavy atoms
        than the smallest, elements or bond patterns the training set never had. An empty list:
        inside the training domain (or none recorded: workdirs from before it was saved)."""
        if self.domain is None:
            return [[] for _ in molecules]
        return [self.domain.check_graph(_as_graph(m)) for m in molecules]


def _as_graph(molecule) -> jraph.GraphsTuple:
    """An unpadded GraphsTuple, or ``(atoms, positions[, bonds])`` made into one."""
    return molecule if isinstance(molecule, jraph.GraphsTuple) else molecule_to_graph(*molecule)


def molecules_to_graphs(molecules: Sequence, budget: PaddingBudget) -> jraph.GraphsTuple:
    """Molecules -> one padded batch. Each molecule is ``(atoms, positions)`` or
    ``(atoms, positions, bonds)``: atoms as element symbols or atomic numbers (H, C, N, O, F),
    positions ``[N, 3]`` in Angstrom, bonds ``[(i, j, "single"|"double"|"triple"|"aromatic")]``;
    without bonds they are inferred from the geometry exactly as for the training data."""
    graphs = [molecule_to_graph(*m) for m in molecules]
    return pad_to_budget(graphs, budget)


def load_predictor(
    workdir: str | Path,
    precision: str | None = None,
    fuse_level: str | None = None,
    batch_size: int = 100,
    step: int | None = None,
) -> Predictor:
    """Load the newest (or ``step``) checkpoint of a training workdir, its saved config and the
    target normalisation. ``precision`` (fp32 | tf32 | bf16 | fp16) and ``fuse_level`` change
    only how the model executes, never its parameters; the model runs the inference plan."""
    workdir = Path(workdir)
    for name in (CONFIG_FILE, NORMALISATION_FILE):
        if not (workdir / name).exists():
            raise FileNotFoundError(
                f"{workdir / name} not found: is {workdir} a training workdir "
                f"(python train/main.py --workdir {workdir})?"
            )
    config = ml_collections.ConfigDict(json.loads((workdir / CONFIG_FILE).read_text()))
    norm = json.loads((workdir / NORMALISATION_FILE).read_text())
    with config.unlocked():
        if precision is not None:
            config.precision = precision
        if fuse_level is not None:
            config.fuse_level = fuse_level
        config.low_memory = False
    model = SE3TransformerPooled(**model_kwargs(config, mode="infer"))
    budget = budget_for_batch(batch_size)
    example = _example_graphs(budget)
    abstract = jax.eval_shape(model.init, jax.random.PRNGKey(0), example)
    checkpointer = Checkpointer(workdir / CHECKPOINT_DIR)
    try:
        restored = checkpointer.restore(step=step)
    finally:
        checkpointer.close()
    if restored is None:
        raise FileNotFoundError(f"no checkpoint in {workdir / CHECKPOINT_DIR}")
    state = restored[0]
    # evaluation's parameters: the moving average when the run kept one
    params = jax.tree.map(jnp.asarray, state.get("ema_params") or state["params"])
    expected = jax.tree.map(lambda x: (x.shape, x.dtype), abstract)
    found = jax.tree.map(lambda x: (x.shape, x.dtype), params)
    if jax.tree.structure(expected) != jax.tree.structure(found) or expected != found:
        raise CheckpointError(
            f"the checkpoint in {workdir} does not match the model of its "
            f"{CONFIG_FILE}: was the config edited after training?"
        )
    domain_file = workdir / DOMAIN_FILE
    domain = TrainingDomain.from_json(json.loads(domain_file.read_text())) if domain_file.exists() else None
    return Predictor(model, params, Normalisation.from_json(norm), budget, domain)


def _example_graphs(budget: PaddingBudget) -> jraph.GraphsTuple:
    """A structurally valid padded batch (one methane-like molecule) for shapes."""
    positions = np.array([[0, 0, 0], [1.09, 0, 0], [-0.36, 1.03, 0], [-0.36, -0.51, 0.89], [-0.36, -0.51, -0.89]])
    mol = molecule_graph(
        positions,
        node_features([6, 1, 1, 1, 1]),
        [0, 1, 0, 2, 0, 3, 0, 4],
        [1, 0, 2, 0, 3, 0, 4, 0],
        np.eye(4)[[0] * 8],
    )  # paired edges
    return pad_to_budget([mol], budget)


# --------------------------------------------------------------------------------------------
# jax.export: a self-contained artifact (parameters baked in) with a flat-array signature


_FLAT_FIELDS = ("positions", "node_features", "edge_features", "senders", "receivers", "n_node", "n_edge")


def _flatten(graphs: jraph.GraphsTuple) -> tuple:
    return (
        graphs.nodes[POSITIONS],
        graphs.nodes[FEATURES],
        graphs.edges[FEATURES],
        graphs.senders,
        graphs.receivers,
        graphs.n_node,
        graphs.n_edge,
    )


_unflatten = graphs_tuple  # its arguments are _FLAT_FIELDS, in that order


def export_predictor(
    predictor: Predictor, path: str | Path, budget: PaddingBudget | None = None, platforms: Sequence[str] | None = None
) -> Path:
    """Serialise ``predict`` (parameters included) for one padding budget with ``jax.export``.

    Writes ``path`` (the serialized StableHLO) and ``path + '.json'`` (task, unit, budget and
    argument order). Load with :func:`load_exported`; no se3jax model code is needed to run it.
    """
    path = Path(path)
    budget = budget or predictor.budget
    example = _example_graphs(budget)
    params = predictor.params

    def flat_predict(*arrays):
        return predictor.predict(params, _unflatten(*arrays))

    specs = [jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype) for x in _flatten(example)]
    exported = jax.export.export(jax.jit(flat_predict), platforms=platforms)(*specs)
    path.write_bytes(exported.serialize())
    Path(str(path) + ".json").write_text(
        json.dumps(
            {
                "task": predictor.task,
                "unit": predictor.unit,
                "arguments": list(_FLAT_FIELDS),
                "budget": dataclasses.asdict(budget),
                "platforms": list(exported.platforms),
            },
            indent=2,
        )
    )
    return path


@dataclasses.dataclass(frozen=True)
class ExportedPredictor:
    """A deserialised predictor: call it with a padded GraphsTuple (or the flat arrays)."""

    exported: Any
    task: str
    unit: str
    budget: PaddingBudget

    def __call__(self, graphs: jraph.GraphsTuple) -> jax.Array:
        return self.exported.call(*_flatten(graphs))


def load_exported(path: str | Path) -> ExportedPredictor:
    path = Path(path)
    meta = json.loads(Path(str(path) + ".json").read_text())
    exported = jax.export.deserialize(bytearray(path.read_bytes()))
    return ExportedPredictor(exported, meta["task"], meta["unit"], PaddingBudget(**meta["budget"]))


# --------------------------------------------------------------------------------------------
# Files of molecules -> predictions (the logic behind scripts/predict.py)


@dataclasses.dataclass
class Prediction:
    source: str
    index: int
    name: str
    num_atoms: int
    value: float
    warnings: list[str] = dataclasses.field(default_factory=list)  # outside the training domain


def predict_files(predictor: Predictor, paths: Sequence[str | Path], batch_size: int = 100, progress: bool = False):
    """Predict every molecule of ``paths`` (.xyz, multi-molecule .xyz, .sdf).

    Returns ``(predictions, errors)``: each error names its file and molecule (unknown
    element, malformed file, empty file, non-finite coordinates, a molecule larger than the
    padding budget, bond inference failure); every other molecule is still predicted.
    """
    budget = budget_for_batch(batch_size)
    records, graphs, errors = [], [], []
    for path in paths:
        for item in read_molecules(path):
            if isinstance(item, MoleculeError):
                errors.append(item)
                continue
            try:
                graph = molecule_to_graph(item.atoms, item.positions)
            except ValueError as err:
                errors.append(MoleculeError(item.source, item.index, str(err)))
                continue
            n, e = int(graph.n_node[0]), int(graph.n_edge[0])
            if not budget.fits(n, e, 1):
                errors.append(
                    MoleculeError(
                        item.source,
                        item.index,
                        f"{n} atoms / {e} bond edges exceed the padding budget {budget}; use a larger --batch-size",
                    )
                )
                continue
            records.append(item)
            graphs.append(graph)
    values = np.zeros(0)
    if graphs:
        with tqdm(total=len(graphs), desc="predicting", unit="mol", disable=not progress) as bar:
            values = predictor.predict_molecules(graphs, batch_size, progress=bar.update)
    warnings = predictor.domain_warnings(graphs)
    predictions = [
        Prediction(r.source, r.index, r.name, len(r.atoms), float(v), w) for r, v, w in zip(records, values, warnings)
    ]
    return predictions, errors
