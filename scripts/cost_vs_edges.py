"""How time and memory grow with the graph: the trunk (the README example's sizes) and the QM9
model, forward and training step, on three kinds of graph of growing size.

    python3 scripts/cost_vs_edges.py --edges 1000 10000 100000 1000000 --out cost.json --plot cost.png

Graphs: ``molecules`` (QM9-sized synthetic molecules batched, bond edges), ``cloud`` (one open
point cloud, radius graph, ~24 neighbours per point) and ``box`` (a periodic box at water's
density, 0.1 atoms/A^3, cutoff 3.5 A, ~18 neighbours, image shifts in the edge vectors); the
radius graphs are padded to 1.2x their mean number of edges (``max_edges``). The graph is built
once per size; each row times the compiled step (the median of at least --steps steps and
--min-seconds, after one warm-up: small graphs take more steps), with the execution plan of its mode
(the forward pass with ``Execution(mode="infer")``, as inference asks for it), and reports XLA's
memory analysis of the compiled step (arguments + outputs + temporaries) and the process's peak
RSS so far (sizes run in increasing order, so it is the largest size's; with --isolate, the
row's own). The QM9 model runs on ``molecules`` up to --qm9-max-edges. Prints a table, writes
the rows as JSON (--out) and a log-log plot of time per edge and peak RSS (--plot).

Peak RSS holds a fixed part that no graph changes (the libraries loaded: 0.22 GB for JAX, 0.36
GB for torch, DGL and NVIDIA's model; for se3jax also the compiler's scratch memory while it
compiles the step: ~0.37 GB for the trunk's training step) and a part that grows with the edges.
With two or more sizes, a second table gives that growth: the peak RSS added per added edge
between consecutive sizes of each series, and the ratio to NVIDIA's over the same sizes.

With ``--reference`` (NVIDIA's ``DGLPyTorch/DrugDiscovery/SE3Transformer`` folder) and
``--reference-python`` (a Python with torch, dgl and e3nn 0.3.3, as for
``scripts/side_by_side.py``), NVIDIA's SE3Transformer with the trunk's fibers runs on the same
graphs (its real edges; the edge vectors with their periodic images), forward and one backward
pass, fp32, in its own process; every row then runs in its own process (``--isolate``) so that
each peak RSS is that row's alone. The reference's code is run from its folder, never copied.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from side_by_side import REFERENCE_PREAMBLE, thread_env  # scripts/, this folder

from se3jax.benchmarking import memory_stats, time_steps
from se3jax.edges import edge_inputs
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.host_memory import compile_and_release, peak_rss_bytes
from se3jax.initialisation import init_params
from se3jax.model import SE3Transformer, SE3TransformerPooled
from se3jax.neighbours import build_radius_graph
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
    # at most 2.2x the mean degree per point, 1.2x the mean number of edges in all (the trunk
    # computes on every budgeted edge, real or padding)
    max_edges = 2 * int(0.6 * n * neighbours)
    graph = build_radius_graph(
        points, cutoff, int(2.2 * neighbours), cell=cell, pbc=periodic, bin_capacity=48, max_edges=max_edges
    )
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


# The trunk: 2 attention layers (8 heads, channels_div 2), degrees 0-2 with 16 channels.
TRUNK_FIBERS = ({0: 8, 1: 2}, (3, 16), {1: 1, 2: 1})


def steps_by_mode(model, forward) -> dict:
    """Each mode's step with the execution plan of that mode, as a user asks for it: the forward
    pass with ``Execution(mode="infer")`` (on a CPU, smaller edge chunks), the gradient of the
    outputs' sum of squares with the training plan. ``forward(model)`` is the model's forward
    function; the parameters are the same for both (a plan never changes them)."""
    infer, train = (model.clone(execution=model.execution.for_mode(m)) for m in ("infer", "train"))
    loss = lambda p, *args: sum(jnp.sum(v**2) for v in jax.tree.leaves(forward(train)(p, *args)))
    return {"forward": forward(infer), "train": jax.grad(loss)}


def trunk_steps(g):
    fiber_in, (degrees, channels), fiber_out = TRUNK_FIBERS
    trunk = SE3Transformer(Fiber(fiber_in), Fiber.create(degrees, channels), Fiber(fiber_out), num_layers=2)
    n = g["positions"].shape[0]
    features = {0: jnp.ones((n, 8, 1)), 1: jnp.zeros((n, 2, 3))}

    def edges(positions, e):
        return edge_inputs(
            positions, e["senders"], e["receivers"], 2, mask=e["mask"], shifts=e.get("shifts"), cell=e.get("cell")
        )

    params = init_params(trunk, jax.random.PRNGKey(0), features, edges(g["positions"], graph_arguments(g)))
    forward = lambda model: lambda p, x, e: model.apply(p, features, edges(x, e))
    return params, steps_by_mode(trunk, forward), graph_arguments(g)


def qm9_steps(g):
    model = SE3TransformerPooled()
    graphs = jax.tree.map(jnp.asarray, g["graphs"])
    params = init_params(model, jax.random.PRNGKey(0), graphs)

    def with_positions(x, graphs):
        return graphs._replace(nodes={**graphs.nodes, POSITIONS: x, FEATURES: graphs.nodes[FEATURES]})

    forward = lambda model: lambda p, x, graphs: model.apply(p, with_positions(x, graphs))
    return params, steps_by_mode(model, forward), graphs


# NVIDIA's SE3Transformer with the trunk's fibers on one graph: forward (inference mode) or
# forward + backward of the same loss; prints one JSON line.
REFERENCE_TRUNK_DRIVER = (
    REFERENCE_PREAMBLE
    + r"""
import math
from se3_transformer.model import Fiber, SE3Transformer

path, mode, steps, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
min_seconds = float(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
data = np.load(path)
fiber_in, (degrees, channels), fiber_out = json.loads(str(data["fibers"]))
graph = dgl.graph((torch.from_numpy(data["senders"]), torch.from_numpy(data["receivers"])),
                  num_nodes=len(data["features_0"]))
graph.edata["rel_pos"] = torch.from_numpy(data["rel_pos"])
node_feats = {"0": torch.from_numpy(data["features_0"]), "1": torch.from_numpy(data["features_1"])}
model = SE3Transformer(
    num_layers=2, fiber_in=Fiber({int(k): v for k, v in fiber_in.items()}),
    fiber_hidden=Fiber.create(degrees, channels), fiber_out=Fiber({int(k): v for k, v in fiber_out.items()}),
    num_heads=8, channels_div=2, norm=True, use_layer_norm=True, tensor_cores=False, low_memory=False)
def step():
    if mode == "train":
        model.zero_grad()
        loss = sum((v ** 2).sum() for v in model(graph, node_feats).values())
        loss.backward()
        return loss.item()
    with torch.inference_mode():
        return sum(v.sum() for v in model(graph, node_feats).values()).item()
start = time.perf_counter()
step()  # the warm-up, timed to choose the number of steps
steps = max(steps, math.ceil(min_seconds / (time.perf_counter() - start)))
print(json.dumps({"seconds": median_step_seconds(step, 0, steps), "peak_rss_bytes": peak_rss()}))
"""
)


def run_reference(g, mode: str, steps: int, min_seconds: float, reference: Path, python: str, threads: int) -> dict:
    """NVIDIA's trunk on graph ``g`` (real edges only) in its own process."""
    real = np.asarray(g["mask"])
    senders, receivers = np.asarray(g["senders"])[real], np.asarray(g["receivers"])[real]
    x = np.asarray(g["positions"], np.float64)
    rel_pos = x[receivers] - x[senders]
    if g["shifts"] is not None:
        rel_pos += np.asarray(g["shifts"])[real] @ np.asarray(g["cell"], np.float64)
    n = len(x)
    with tempfile.TemporaryDirectory() as tmp:
        data, driver = Path(tmp) / "graph.npz", Path(tmp) / "reference_trunk_driver.py"
        np.savez(
            data, senders=senders.astype(np.int64), receivers=receivers.astype(np.int64),
            rel_pos=rel_pos.astype(np.float32), features_0=np.ones((n, 8, 1), np.float32),
            features_1=np.zeros((n, 2, 3), np.float32), fibers=json.dumps(TRUNK_FIBERS),
        )  # fmt: skip
        driver.write_text(REFERENCE_TRUNK_DRIVER)
        env = {**thread_env(threads), "PYTHONPATH": str(reference)}
        command = [python, str(driver), str(data), "train" if mode == "train" else "infer", str(steps), str(threads)]
        command.append(str(min_seconds))
        done = subprocess.run(command, env=env, cwd=reference, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the reference failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def time_compiled(fn, args, steps: int, min_seconds: float):
    """The median step time over at least ``steps`` steps and ``min_seconds`` (small graphs take
    more steps: one 0.1 s step is mostly noise), and XLA's memory analysis."""
    compiled = compile_and_release(jax.jit(fn), *args)  # as the benchmarks: no compiler scratch kept
    run = lambda: jax.block_until_ready(compiled(*args))
    (warmup,) = time_steps(run, 0, 1)
    times = time_steps(run, 0, max(steps, math.ceil(min_seconds / warmup)))
    return statistics.median(times), memory_stats(compiled)


COLUMNS = ("model", "graph", "mode", "edges", "s/step", "us/edge", "XLA MB", "B/edge", "RSS MB")
WIDTHS = (6, 9, 8, 9, 9, 8, 8, 8, 8)


def print_row(row: dict) -> None:
    xla = row.get("total_bytes", float("nan"))
    values = (
        row["model"], row["graph"], row["mode"], row["edges"], f"{row['seconds']:.4f}",
        f"{row['seconds_per_edge'] * 1e6:.2f}", f"{xla / 1e6:.1f}", f"{xla / row['edges']:.0f}",
        f"{row['peak_rss_bytes'] / 1e6:.0f}",
    )  # fmt: skip
    print(" ".join(f"{v:>{w}}" for v, w in zip(values, WIDTHS)), flush=True)


def measure(num_edges: int, kind: str, modes, args) -> list[dict]:
    """The rows of one graph (se3jax's trunk, the QM9 model, and NVIDIA's trunk if asked)."""
    rng = np.random.default_rng([num_edges, ("molecules", "cloud", "box").index(kind)])
    g = molecules(num_edges, rng) if kind == "molecules" else radius(num_edges, rng, kind == "box")
    real_edges = int(jnp.sum(g["mask"]))
    models = [("trunk", trunk_steps)]
    if kind == "molecules" and num_edges <= args.qm9_max_edges:
        models.append(("qm9", qm9_steps))
    rows = []
    for model_name, make in models:
        params, steps, graph = make(g)
        for mode in modes:
            seconds, memory = time_compiled(steps[mode], (params, g["positions"], graph), args.steps, args.min_seconds)
            rows.append(
                dict(
                    model=model_name, graph=kind, mode=mode, edges=real_edges, padded_edges=int(g["mask"].shape[0]),
                    seconds=seconds, seconds_per_edge=seconds / real_edges, peak_rss_bytes=peak_rss_bytes(), **memory,
                )
            )  # fmt: skip
            rows[-1]["bytes_per_edge"] = rows[-1].get("total_bytes", float("nan")) / real_edges
            print_row(rows[-1])
    for mode in modes if args.reference and num_edges <= args.reference_max_edges else ():
        done = run_reference(g, mode, args.steps, args.min_seconds, args.reference, args.reference_python, args.threads)
        rows.append(
            dict(
                model="nvidia", graph=kind, mode=mode, edges=real_edges, seconds=done["seconds"],
                seconds_per_edge=done["seconds"] / real_edges, peak_rss_bytes=done["peak_rss_bytes"],
                bytes_per_edge=float("nan"),
            )
        )  # fmt: skip
        print_row(rows[-1])
    return rows


def memory_growth(rows) -> list[dict]:
    """Peak RSS added per added edge between consecutive sizes of each (model, graph, mode)
    series: the part of the memory that grows with the graph, without the fixed part."""
    series = {}
    for r in rows:
        series.setdefault((r["model"], r["graph"], r["mode"]), []).append(r)
    growth = []
    for (model, graph, mode), points in sorted(series.items()):
        points = sorted(points, key=lambda r: r["edges"])
        for a, b in zip(points, points[1:]):
            added = (b["peak_rss_bytes"] - a["peak_rss_bytes"]) / (b["edges"] - a["edges"])
            growth.append(
                dict(model=model, graph=graph, mode=mode, from_edges=a["edges"], to_edges=b["edges"],
                     bytes_per_added_edge=added)
            )  # fmt: skip
    return growth


def print_growth(growth) -> None:
    if not growth:
        return
    nvidia = {(g["graph"], g["mode"], g["from_edges"], g["to_edges"]): g for g in growth if g["model"] == "nvidia"}
    print("\npeak RSS added per added edge (bytes), and the ratio to NVIDIA's over the same sizes")
    for g in growth:
        ref = nvidia.get((g["graph"], g["mode"], g["from_edges"], g["to_edges"]))
        ratio = f"{g['bytes_per_added_edge'] / ref['bytes_per_added_edge']:.2f}x" if ref and g is not ref else ""
        print(
            f"{g['model']:>6} {g['graph']:>9} {g['mode']:>8} {g['from_edges']:>9} -> {g['to_edges']:<9}"
            f" {g['bytes_per_added_edge']:>8.0f} {ratio}"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--edges", type=int, nargs="+", default=[1000, 3000, 10000, 30000])
    parser.add_argument("--graphs", nargs="+", default=["molecules", "cloud", "box"])
    parser.add_argument("--modes", nargs="+", default=["forward", "train"], choices=["forward", "train"])
    parser.add_argument("--qm9-max-edges", type=int, default=3000)
    parser.add_argument("--steps", type=int, default=3, help="timed steps (median), at least")
    parser.add_argument("--min-seconds", type=float, default=5.0, help="and at least this long in timed steps")
    parser.add_argument("--isolate", action="store_true", help="each graph and mode in its own process (own RSS)")
    parser.add_argument("--reference", type=Path, help="NVIDIA's DGLPyTorch/DrugDiscovery/SE3Transformer folder")
    parser.add_argument("--reference-python", help="a Python with torch, dgl and e3nn for the reference")
    parser.add_argument(
        "--reference-max-edges", type=int, default=300_000,
        help="run the reference up to this many edges (its training needs ~65 kB per edge)",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=2, help="the reference's torch threads")
    parser.add_argument("--rows-json", help=argparse.SUPPRESS)  # an --isolate child writes its rows here
    parser.add_argument("--out", default=None)
    parser.add_argument("--plot", default=None)
    args = parser.parse_args()
    if (args.reference is None) != (args.reference_python is None):
        parser.error("--reference and --reference-python go together")
    rows = []
    if not args.rows_json:
        print(" ".join(f"{c:>{w}}" for c, w in zip(COLUMNS, WIDTHS)))
    for num_edges in sorted(args.edges):
        for kind in args.graphs:
            if not (args.isolate or args.reference) or args.rows_json:
                rows += measure(num_edges, kind, args.modes, args)
                continue
            for mode in args.modes:  # a child process per graph and mode: its peak RSS is its own
                with tempfile.TemporaryDirectory() as tmp:
                    out = Path(tmp) / "rows.json"
                    command = [sys.executable, __file__, "--edges", str(num_edges), "--graphs", kind, "--modes", mode]
                    command += ["--steps", str(args.steps), "--min-seconds", str(args.min_seconds)]
                    command += ["--qm9-max-edges", str(args.qm9_max_edges)]
                    command += ["--rows-json", str(out), "--threads", str(args.threads)]
                    if args.reference:
                        command += ["--reference", str(args.reference), "--reference-python", args.reference_python]
                        command += ["--reference-max-edges", str(args.reference_max_edges)]
                    subprocess.run(command, check=True)
                    rows += json.loads(out.read_text())
    if args.rows_json:
        Path(args.rows_json).write_text(json.dumps(rows))
        return
    growth = memory_growth(rows)
    print_growth(growth)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(
                dict(backend=jax.default_backend(), device=str(jax.devices()[0]), rows=rows, memory_growth=growth),
                f, indent=1,
            )  # fmt: skip
    if args.plot:
        plot(rows, args.plot)


def plot(rows, path):
    import matplotlib  # only for --plot

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    series = sorted({(r["model"], r["graph"], r["mode"]) for r in rows})
    for key in series:
        pts = sorted(
            (r["edges"], r["seconds_per_edge"] * 1e6, r["peak_rss_bytes"] / 1e6)
            for r in rows
            if (r["model"], r["graph"], r["mode"]) == key
        )
        e = [p[0] for p in pts]
        label = " ".join(("se3jax " + key[0] if key[0] != "nvidia" else "NVIDIA", *key[1:]))
        style = dict(marker="o", linestyle="--" if key[0] == "nvidia" else "-")
        axes[0].plot(e, [p[1] for p in pts], label=label, **style)
        axes[1].plot(e, [p[2] for p in pts], **style)
    # memory as a whole, not per edge: a fixed part (runtime, compiler) plus a part that grows
    for ax, label in zip(axes, ("time per edge (us)", "peak RSS (MB)")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("edges")
        ax.set_ylabel(label)
    fig.legend(fontsize=7, loc="center right")
    fig.suptitle(f"cost vs graph size ({jax.default_backend()}; NVIDIA: its reference on the same graphs)")
    fig.tight_layout(rect=(0, 0, 0.8, 1))
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
