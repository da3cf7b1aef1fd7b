"""How time and memory grow with the graph: the trunk (the README example's sizes) and the QM9
model, forward and training step, on three kinds of graph of growing size.

    python3 scripts/cost_vs_edges.py --edges 1000 10000 100000 1000000 --out cost.json --plot cost.png

Graphs: ``molecules`` (QM9-sized synthetic molecules batched, bond edges), ``cloud`` (one open
point cloud, radius graph from the cell list, ~24 neighbours per point) and ``box`` (a
periodic box at water's density, 0.1 atoms/A^3, cutoff 3.5 A, ~18 neighbours, image shifts in
the edge vectors). The graph is built once per size; each row times the compiled step (median
of --steps after one warm-up), and reports XLA's memory analysis of the compiled step
(arguments + outputs + temporaries) and the process's peak RSS so far (sizes run in increasing
order, so it is the largest size's). The QM9 model runs on ``molecules`` up to --qm9-max-edges.
Prints a table, writes the rows as JSON (--out) and a log-log plot of time and memory per edge
(--plot).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from se3jax.benchmarking import memory_stats, peak_rss_bytes
from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.model import SE3Transformer, SE3TransformerPooled
from se3jax.neighbours import cell_list_radius_graph
from se3jax.testing import synthetic_batch

EDGES_PER_MOLECULE = 38  # synthetic QM9-sized molecules: ~18 atoms, ~38 directed bond edges


def molecules(num_edges: int, rng):
    graphs = synthetic_batch(rng, max(1, num_edges // EDGES_PER_MOLECULE))
    masks = padding_masks(graphs)
    return dict(
        positions=jnp.asarray(graphs.nodes[POSITIONS]),
        senders=jnp.asarray(graphs.senders),
        receivers=jnp.asarray(graphs.receivers),
        mask=jnp.asarray(masks.edges),
        shifts=None,
        cell=None,
        graphs=graphs,
    )


def radius(num_edges: int, rng, periodic: bool):
    neighbours, cutoff = (18, 3.5) if periodic else (24, 2.0)
    n = max(8, num_edges // neighbours)
    density = 0.1 if periodic else neighbours / (4 / 3 * np.pi * cutoff**3)
    side = (n / density) ** (1 / 3)
    points = rng.uniform(0, side, size=(n, 3)).astype(np.float32)
    cell = np.eye(3) * side if periodic else None
    # a budget of ~2.2x the mean degree (the trunk computes on every budgeted edge, real or not)
    graph = cell_list_radius_graph(points, cutoff, int(2.2 * neighbours), cell=cell, pbc=periodic, bin_capacity=48)
    if int(graph.overflow):
        raise RuntimeError(f"graph overflow {int(graph.overflow)}")
    return dict(
        positions=jnp.asarray(points),
        senders=graph.senders,
        receivers=graph.receivers,
        mask=graph.mask,
        shifts=graph.shifts,
        cell=None if cell is None else jnp.asarray(cell, jnp.float32),
    )


def graph_arguments(g) -> dict:
    """The edge list as arguments of the compiled step (not constants baked into it)."""
    return {k: g[k] for k in ("senders", "receivers", "mask", "shifts", "cell") if g[k] is not None}


def trunk_steps(g):
    trunk = SE3Transformer(
        Fiber({0: 8, 1: 2}), Fiber.create(3, 16), Fiber({1: 1, 2: 1}), num_layers=2, execution=Execution()
    )
    n = g["positions"].shape[0]
    features = {0: jnp.ones((n, 8, 1)), 1: jnp.zeros((n, 2, 3))}

    def edges(positions, e):
        return edge_inputs(
            positions, e["senders"], e["receivers"], 2, mask=e["mask"], shifts=e.get("shifts"), cell=e.get("cell")
        )

    params = jax.jit(trunk.init)(jax.random.PRNGKey(0), features, edges(g["positions"], graph_arguments(g)))
    forward = lambda p, x, e: trunk.apply(p, features, edges(x, e))
    loss = lambda p, x, e: sum(jnp.sum(v**2) for v in forward(p, x, e).values())
    return params, forward, jax.grad(loss), graph_arguments(g)


def qm9_steps(g):
    model = SE3TransformerPooled()
    graphs = jax.tree.map(jnp.asarray, g["graphs"])
    params = jax.jit(model.init)(jax.random.PRNGKey(0), graphs)

    def with_positions(x, graphs):
        return graphs._replace(nodes={**graphs.nodes, POSITIONS: x, FEATURES: graphs.nodes[FEATURES]})

    forward = lambda p, x, graphs: model.apply(p, with_positions(x, graphs))
    loss = lambda p, x, graphs: jnp.sum(forward(p, x, graphs) ** 2)
    return params, forward, jax.grad(loss), graphs


def time_compiled(fn, args, steps: int):
    compiled = jax.jit(fn).lower(*args).compile()
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times), memory_stats(compiled)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, nargs="+", default=[1000, 3000, 10000, 30000])
    parser.add_argument("--graphs", nargs="+", default=["molecules", "cloud", "box"])
    parser.add_argument("--qm9-max-edges", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    rows = []
    columns = ("model", "graph", "mode", "edges", "s/step", "us/edge", "XLA MB", "B/edge", "RSS MB")
    header = " ".join(f"{c:>{w}}" for c, w in zip(columns, (6, 9, 8, 9, 9, 8, 8, 8, 8)))
    print(header)
    for num_edges in sorted(args.edges):
        for kind in args.graphs:
            g = molecules(num_edges, rng) if kind == "molecules" else radius(num_edges, rng, kind == "box")
            real_edges = int(jnp.sum(g["mask"]))
            models = [("trunk", trunk_steps)]
            if kind == "molecules" and num_edges <= args.qm9_max_edges:
                models.append(("qm9", qm9_steps))
            for model_name, make in models:
                params, forward, train, graph = make(g)
                for mode, fn in (("forward", forward), ("train", train)):
                    seconds, memory = time_compiled(fn, (params, g["positions"], graph), args.steps)
                    row = dict(
                        model=model_name, graph=kind, mode=mode, edges=real_edges, padded_edges=int(g["mask"].shape[0]),
                        seconds=seconds, seconds_per_edge=seconds / real_edges, peak_rss_bytes=peak_rss_bytes(),
                        **memory,
                    )  # fmt: skip
                    xla = row.get("total_bytes", float("nan"))
                    row["bytes_per_edge"] = xla / real_edges
                    rows.append(row)
                    print(
                        f"{model_name:>6} {kind:>9} {mode:>8} {real_edges:>9} {seconds:>9.4f} "
                        f"{seconds / real_edges * 1e6:>8.2f} {xla / 1e6:>8.1f} {xla / real_edges:>8.0f} "
                        f"{row['peak_rss_bytes'] / 1e6:>8.0f}",
                        flush=True,
                    )
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(backend=jax.default_backend(), device=str(jax.devices()[0]), rows=rows), f, indent=1)
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path):
    import matplotlib  # only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    series = sorted({(r["model"], r["graph"], r["mode"]) for r in rows})
    for key in series:
        pts = sorted(
            (r["edges"], r["seconds_per_edge"] * 1e6, r["bytes_per_edge"])
            for r in rows
            if (r["model"], r["graph"], r["mode"]) == key
        )
        e = [p[0] for p in pts]
        axes[0].plot(e, [p[1] for p in pts], marker="o", label=" ".join(key))
        axes[1].plot(e, [p[2] for p in pts], marker="o", label=" ".join(key))
    for ax, label in zip(axes, ("time per edge (us)", "XLA memory per edge (bytes)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"se3jax cost vs graph size ({jax.default_backend()})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
