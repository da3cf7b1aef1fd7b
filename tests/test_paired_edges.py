"""Paired edges (edges 2k and 2k+1 are the two directions of one bond) are checked on the host
where data enters -- the batch loader and the predictor -- with an error naming the broken pair:
a compiled model cannot raise, and would only output NaN."""

import jax
import numpy as np
import pytest

from se3jax.data.loader import BatchLoader
from se3jax.data.qm9 import Normalisation
from se3jax.graphs import PaddingBudget, check_paired_edges, pad_to_budget
from se3jax.inference import Predictor
from se3jax.initialisation import init_params
from se3jax.model import SE3TransformerPooled
from se3jax.testing import synthetic_molecule

BROKEN = "expects paired edges.*edges 2 and 3 are"


def molecules():
    """Two paired molecules, and the first with its second bond's return edge rerouted."""
    rng = np.random.default_rng(0)
    good = [synthetic_molecule(rng, 6), synthetic_molecule(rng, 5)]
    receivers = good[0].receivers.copy()
    receivers[3] = next(n for n in range(6) if n not in (good[0].senders[3], receivers[3]))  # another atom
    return good, [good[0]._replace(receivers=receivers), good[1]]


class Molecules:
    """The dataset interface the loader reads."""

    def __init__(self, graphs):
        self.graphs = graphs
        self.num_nodes = np.array([int(g.n_node[0]) for g in graphs])
        self.num_edges = np.array([int(g.n_edge[0]) for g in graphs])

    def batch_graphs(self, indices):
        return [self.graphs[i] for i in indices]


BUDGET = PaddingBudget(n_node=16, n_edge=32, n_graph=3)


def test_the_check_names_the_first_broken_pair():
    good, bad = molecules()
    check_paired_edges(pad_to_budget(good, BUDGET))  # padding edges pair up too
    with pytest.raises(ValueError, match=BROKEN):
        check_paired_edges(bad[0])
    odd = good[1]._replace(senders=good[1].senders[:-1], receivers=good[1].receivers[:-1])
    with pytest.raises(ValueError, match="odd number of edges"):
        check_paired_edges(odd)


def test_the_batch_loader_refuses_unpaired_edges():
    good, bad = molecules()
    for graphs, fails in ((good, False), (bad, True)):
        loader = BatchLoader(Molecules(graphs), np.arange(2), 2, BUDGET, shuffle=False)
        if fails:
            with pytest.raises(ValueError, match=BROKEN):
                loader.assemble(loader.plan(0)[0])
        else:
            loader.assemble(loader.plan(0)[0])


def test_the_predictor_refuses_unpaired_edges_that_would_give_nan():
    good, bad = molecules()
    model = SE3TransformerPooled(num_layers=1, num_degrees=2, num_channels=8, num_heads=2)
    params = init_params(model, jax.random.PRNGKey(0), pad_to_budget(good, BUDGET))
    predictor = Predictor(model, params, Normalisation("homo", "eV", 0.0, 1.0), BUDGET)
    assert np.isfinite(np.asarray(predictor.jitted(params, pad_to_budget(good, BUDGET)))[:2]).all()
    unpaired = pad_to_budget(bad, BUDGET)
    assert np.isnan(np.asarray(jax.jit(predictor.predict)(params, unpaired))[:2]).all()  # what it prevents
    with pytest.raises(ValueError, match=BROKEN):
        predictor.jitted(params, unpaired)
