"""se3jax next to NVIDIA's PyTorch/DGL SE(3)-Transformer on the same synthetic batch.

    python scripts/side_by_side.py --batch-size 100                       # se3jax only
    python scripts/side_by_side.py --batch-size 100 \\
        --reference /path/to/DeepLearningExamples/DGLPyTorch/DrugDiscovery/SE3Transformer \\
        --reference-python /path/to/venv/bin/python                       # both, A/B/A

Each measurement runs in its own process (so its peak resident set size is its own), with the
same number of threads, and the two implementations alternate A/B/A... (``--repeats``) so that
load from other processes falls on both alike. The batch is se3jax's synthetic QM9-sized batch
(:func:`se3jax.testing.synthetic_batch`, fixed seed); its real molecules are written to a
temporary ``.npz`` that the reference side reads back as one batched DGL graph (the same atoms,
bonds, features and positions; no padding). Both run the QM9 network (7 attention layers, 4
degrees, 32 channels, 8 heads, max pooling), fp32: inference is the forward pass, training one
step of Adam on an L1 loss.

NVIDIA's code is never copied here: a small driver is written to a temporary file at run time
and run by ``--reference-python`` from the reference checkout. That Python needs torch, dgl and
e3nn 0.3.3 (the reference's requirements; apex is not needed: the driver uses torch's Adam).
DGL wheels built for an older torch may lack their ``graphbolt`` library; the driver stubs that
submodule (the model does not use it) and makes CUDA's NVTX ranges no-ops.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from se3jax.graphs import FEATURES, POSITIONS, padding_masks  # noqa: E402
from se3jax.testing import synthetic_batch  # noqa: E402

# The start of every driver run in the reference's Python, from its checkout (also
# scripts/cost_vs_edges.py's): imports torch and dgl as the reference needs them on a CPU.
REFERENCE_PREAMBLE = r"""
import contextlib, json, resource, statistics, sys, time, types
import numpy as np

class _Stub(types.ModuleType):  # dgl.graphbolt: a C++ library per torch version, unused here
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        return type(name, (), {})

import torch
torch.cuda.nvtx.range = lambda *a, **k: contextlib.nullcontext()
if hasattr(torch.serialization, "add_safe_globals"):  # e3nn 0.3.3 loads its constants with slices
    torch.serialization.add_safe_globals([slice])
try:
    import dgl
except (FileNotFoundError, ImportError):
    for name in [m for m in sys.modules if m == "dgl" or m.startswith("dgl.")]:
        del sys.modules[name]
    stub = _Stub("dgl.graphbolt")
    stub.__path__ = []
    sys.modules["dgl.graphbolt"] = stub
    import dgl

def peak_rss():  # VmHWM: ru_maxrss survives exec and would report a larger parent's peak
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))

def median_step_seconds(step, warmup, steps):
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
"""

# Reads the batch, builds the model with the QM9 settings of the reference's scripts, times
# steps, prints one JSON line.
REFERENCE_DRIVER = (
    REFERENCE_PREAMBLE
    + r"""
from se3_transformer.model import Fiber, SE3TransformerPooled

path, mode, steps, warmup, threads = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
torch.set_num_threads(threads)
torch.manual_seed(0)
data = np.load(path)
graph = dgl.graph((torch.from_numpy(data["senders"]), torch.from_numpy(data["receivers"])),
                  num_nodes=len(data["positions"]))
graph.set_batch_num_nodes(torch.from_numpy(data["n_node"]))
graph.set_batch_num_edges(torch.from_numpy(data["n_edge"]))
pos = torch.from_numpy(data["positions"])
src, dst = graph.edges()
graph.edata["rel_pos"] = pos[dst] - pos[src]
node_feats = {"0": torch.from_numpy(data["node_features"])[:, :, None]}
edge_feats = {"0": torch.from_numpy(data["edge_features"])[:, :, None]}
target = torch.from_numpy(data["target"])
model = SE3TransformerPooled(
    fiber_in=Fiber({0: node_feats["0"].shape[1]}), fiber_out=Fiber({0: 4 * 32}),
    fiber_edge=Fiber({0: edge_feats["0"].shape[1]}), output_dim=1, num_degrees=4, num_channels=32,
    num_layers=7, num_heads=8, channels_div=2, pooling="max", norm=True, use_layer_norm=True,
    tensor_cores=False, low_memory=False)
if mode == "train":
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, betas=(0.9, 0.999), weight_decay=0.1)
    loss_fn = torch.nn.L1Loss()
    def step():
        optimizer.zero_grad()
        loss = loss_fn(model(graph, node_feats, edge_feats), target)
        loss.backward()
        optimizer.step()
        return loss.item()
else:
    model.eval()
    def step():
        with torch.inference_mode():
            return model(graph, node_feats, edge_feats).sum().item()
median = median_step_seconds(step, warmup, steps)
print(json.dumps({"molecules_per_s": len(data["n_node"]) / median, "step_s": median,
                  "peak_rss_bytes": peak_rss(),
                  "torch": torch.__version__, "dgl": dgl.__version__}))
"""
)


def write_batch(batch_size: int, seed: int, path: Path) -> int:
    """The real molecules of se3jax's synthetic batch as plain arrays; returns their count."""
    graphs = synthetic_batch(np.random.default_rng(seed), batch_size)
    masks = padding_masks(graphs)
    nodes, edges, real = (int(np.sum(np.asarray(m))) for m in (masks.nodes, masks.edges, masks.graphs))
    np.savez(
        path,
        positions=np.asarray(graphs.nodes[POSITIONS][:nodes], np.float32),
        node_features=np.asarray(graphs.nodes[FEATURES][:nodes], np.float32),
        edge_features=np.asarray(graphs.edges[FEATURES][:edges], np.float32),
        senders=np.asarray(graphs.senders[:edges], np.int64),
        receivers=np.asarray(graphs.receivers[:edges], np.int64),
        n_node=np.asarray(graphs.n_node[:real], np.int64),
        n_edge=np.asarray(graphs.n_edge[:real], np.int64),
        target=np.asarray(graphs.globals["target"][:real], np.float32),
    )
    return real


def thread_env(threads: int) -> dict:
    """PyTorch's thread pools sized by these; XLA's CPU client uses every core it is given
    (run under ``taskset`` to give both sides the same cores on a bigger machine)."""
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}


def run_se3jax(mode: str, batch_size: int, steps: int, warmup: int, threads: int, extra: list[str]) -> dict:
    """One benchmark row of scripts/benchmark.py in its own process (own peak RSS)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "row.json"
        command = [sys.executable, str(ROOT / "scripts" / "benchmark.py"), "--mode", mode, "--batch-size"]
        command += [str(batch_size), "--steps", str(steps), "--warmup", str(warmup), "--json", str(out), *extra]
        subprocess.run(command, check=True, env=thread_env(threads), stdout=subprocess.DEVNULL)
        return json.loads(out.read_text())[0]


def run_reference(mode: str, batch: Path, steps: int, warmup: int, threads: int, reference: Path, python: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        driver = Path(tmp) / "reference_driver.py"
        driver.write_text(REFERENCE_DRIVER)
        env = {**thread_env(threads), "PYTHONPATH": str(reference)}
        command = [python, str(driver), str(batch), mode, str(steps), str(warmup), str(threads)]
        done = subprocess.run(command, env=env, cwd=reference, capture_output=True, text=True)
        if done.returncode:
            raise RuntimeError(f"the reference failed ({' '.join(command)}):\n{done.stderr[-3000:]}")
        return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--mode", nargs="+", default=["infer", "train"], choices=["train", "infer"])
    parser.add_argument("--reference", type=Path, help="NVIDIA's DGLPyTorch/DrugDiscovery/SE3Transformer folder")
    parser.add_argument("--reference-python", help="a Python with torch, dgl and e3nn for the reference")
    parser.add_argument("--repeats", type=int, default=2, help="se3jax runs; the reference runs between them")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run (median)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--se3jax-args", nargs=argparse.REMAINDER, default=[], help="passed to scripts/benchmark.py")
    args = parser.parse_args(argv)
    if (args.reference is None) != (args.reference_python is None):
        parser.error("--reference and --reference-python go together")
    if args.reference is not None and not (args.reference / "se3_transformer" / "model").is_dir():
        parser.error(f"{args.reference} is not the reference's SE3Transformer folder (no se3_transformer/model)")

    with tempfile.TemporaryDirectory() as tmp:
        batch = Path(tmp) / "batch.npz"
        molecules = write_batch(args.batch_size, args.seed, batch)
        print(f"batch {args.batch_size}: {molecules} molecules, fp32, {args.threads} threads", flush=True)
        for mode in args.mode:
            rows = {"se3jax": [], "nvidia": []}
            for i in range(args.repeats):
                if i and args.reference is not None:  # A/B/A: the reference between se3jax runs
                    rows["nvidia"].append(
                        run_reference(
                            mode, batch, args.steps, args.warmup, args.threads, args.reference, args.reference_python
                        )
                    )
                    _print("nvidia", mode, rows["nvidia"][-1])
                rows["se3jax"].append(
                    run_se3jax(mode, args.batch_size, args.steps, args.warmup, args.threads, args.se3jax_args)
                )
                _print("se3jax", mode, rows["se3jax"][-1])
            summary = {k: _summary(v) for k, v in rows.items() if v}
            if "nvidia" in summary:
                s, n = summary["se3jax"], summary["nvidia"]
                print(
                    f"{mode}: se3jax {s['molecules_per_s']:.1f} mol/s, {s['peak_rss_gb']:.2f} GB | "
                    f"NVIDIA {n['molecules_per_s']:.1f} mol/s, {n['peak_rss_gb']:.2f} GB | "
                    f"speed {s['molecules_per_s'] / n['molecules_per_s']:.2f}x, "
                    f"peak RSS {s['peak_rss_gb'] / n['peak_rss_gb']:.2f}x",
                    flush=True,
                )
            else:
                s = summary["se3jax"]
                print(f"{mode}: se3jax {s['molecules_per_s']:.1f} mol/s, {s['peak_rss_gb']:.2f} GB", flush=True)
    return 0


def _print(name: str, mode: str, row: dict) -> None:
    stamp = time.strftime("%H:%M:%S")
    print(
        f"  {stamp} {name} {mode}: {row['molecules_per_s']:.1f} mol/s, peak RSS {row['peak_rss_bytes'] / 1e9:.2f} GB",
        flush=True,
    )


def _summary(rows: list[dict]) -> dict:
    """Medians over the runs of one side."""
    return {
        "molecules_per_s": statistics.median(r["molecules_per_s"] for r in rows),
        "peak_rss_gb": statistics.median(r["peak_rss_bytes"] for r in rows) / 1e9,
    }


if __name__ == "__main__":
    sys.exit(main())
