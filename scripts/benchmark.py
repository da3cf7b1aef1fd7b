"""Benchmark the QM9 SE(3)-Transformer: training step and inference throughput, compile time,
XLA's memory analysis and FLOP count, per fusion level, precision and low-memory setting.

    python scripts/benchmark.py                              # auto level, fp32, batch 100
    python scripts/benchmark.py --fuse-level none partial_out full --low-memory both
    python scripts/benchmark.py --precision fp32 bf16 --batch-size 240 --json out.json

Batches are synthetic QM9-like molecules (about 18 atoms and 38 directed bond edges each),
padded to the budget the QM9 loader uses for the batch size. Throughput is the median over
timed steps after warm-up; compile time is reported separately.
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from se3jax.basis import edge_geometry
from se3jax.graphs import HARMONICS, padding_masks
from se3jax.layers import FuseLevel
from se3jax.model import SE3TransformerPooled
from se3jax.testing import synthetic_batch
from se3jax.training import create_train_state, make_train_step


def flop_count(lowered) -> float:
    """XLA's FLOP estimate of a lowered (not yet compiled) computation."""
    cost = lowered.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled computation: argument + output + temp bytes, less
    the outputs that reuse donated argument buffers (the train state is updated in place)."""
    mem = compiled.memory_analysis()
    out = {}
    if mem is not None:
        out.update(argument_bytes=mem.argument_size_in_bytes, output_bytes=mem.output_size_in_bytes,
                   alias_bytes=mem.alias_size_in_bytes, temp_bytes=mem.temp_size_in_bytes)
        out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                              + out["temp_bytes"])
    return out


def time_steps(run, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def benchmark_one(fuse_level: str, precision: str, low_memory: bool, batch_size: int,
                  steps: int, warmup: int, mode: str, num_layers: int, edges: str = "paired",
                  precompute_bases: bool = False) -> dict:
    rng = np.random.default_rng(0)
    batch = synthetic_batch(rng, batch_size)
    if precompute_bases:  # as the loader does with config.precompute_bases
        harmonics, _ = edge_geometry(batch.nodes["positions"], batch.senders, batch.receivers, 6)
        batch = batch._replace(edges={**batch.edges, HARMONICS: np.asarray(harmonics)})
    batch = jax.device_put(batch)
    num_molecules = int(np.sum(np.asarray(padding_masks(batch)[2])))
    model = SE3TransformerPooled(num_layers=num_layers, fuse_level=fuse_level,
                                 precision=precision, low_memory=low_memory,
                                 paired_edges=edges == "paired")
    result = {"fuse_level": fuse_level, "precision": precision, "low_memory": low_memory, "edges": edges,
              "precompute_bases": precompute_bases,
              "batch_size": batch_size, "molecules": num_molecules, "mode": mode,
              "num_nodes": int(batch.nodes["positions"].shape[0]), "num_edges": int(batch.senders.shape[0])}
    optimizer = optax.adamw(2e-3, weight_decay=0.1)
    state = create_train_state(model, optimizer, batch, jax.random.PRNGKey(0),
                               loss_scaling=precision == "fp16")
    def jitted(m):
        if mode == "train":
            return jax.jit(make_train_step(m, optimizer), donate_argnums=0)
        return jax.jit(m.apply)

    args = (state, batch) if mode == "train" else (state.params, batch)
    start = time.perf_counter()
    compiled = jitted(model).lower(*args).compile()
    result["compile_s"] = time.perf_counter() - start
    result.update(memory_stats(compiled))
    # XLA counts a loop body once, so count FLOPs on the same step with edges unchunked.
    result["flops"] = flop_count(jitted(model.clone(edge_chunk=1 << 30)).lower(*args))

    holder = {"state": state}

    def run():
        if mode == "train":
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)
        else:
            jax.block_until_ready(compiled(state.params, batch))

    times = time_steps(run, warmup, steps)
    median = statistics.median(times)
    result.update(step_s=median, molecules_per_s=num_molecules / median,
                  gflops_per_s=result["flops"] / median / 1e9)
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuse-level", nargs="+", default=["auto"], choices=[l.value for l in FuseLevel])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--low-memory", default="off", choices=["off", "on", "both"])
    parser.add_argument("--edges", nargs="+", default=["paired"], choices=["paired", "unpaired"],
                        help="paired: radial weights once per bond (the QM9 pipeline's layout)")
    parser.add_argument("--precompute-bases", action="store_true",
                        help="feed precomputed edge harmonics (config.precompute_bases)")
    parser.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--num-layers", type=int, default=7, help="attention layers (QM9 model: 7)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)

    low_memory = {"off": [False], "on": [True], "both": [False, True]}[args.low_memory]
    print(f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__}", flush=True)
    header = (f"{'mode':5} {'level':11} {'prec':4} {'lowmem':6} {'edges':8} {'mol/s':>7} {'step s':>7} "
              f"{'compile s':>9} {'XLA mem GB':>10} {'GFLOP':>7} {'GFLOP/s':>7}")
    print(header, flush=True)
    results = []
    for mode, level, precision, low, edges in itertools.product(
            args.mode, args.fuse_level, args.precision, low_memory, args.edges):
        r = benchmark_one(level, precision, low, args.batch_size, args.steps, args.warmup, mode,
                          args.num_layers, edges, args.precompute_bases)
        results.append(r)
        print(f"{mode:5} {level:11} {precision:4} {str(low):6} {edges:8} {r['molecules_per_s']:7.1f} {r['step_s']:7.3f} "
              f"{r['compile_s']:9.1f} {r.get('total_bytes', float('nan')) / 1e9:10.2f} "
              f"{r['flops'] / 1e9:7.0f} {r['gflops_per_s']:7.1f}", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
