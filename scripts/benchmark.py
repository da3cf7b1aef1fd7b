"""Benchmark the QM9 SE(3)-Transformer: training step and inference throughput, compile time,
XLA's memory analysis and FLOP count, for every combination of the options given.

    python scripts/benchmark.py                              # auto plan, fp32, batch 100
    python scripts/benchmark.py --fuse-level none partial_out full --low-memory both
    python scripts/benchmark.py --precision fp32 bf16 --batch-size 240 --edge-chunk 0 512 1024
    python scripts/benchmark.py --loader                     # the QM9 input pipeline alone
    python scripts/benchmark.py --mode infer --edge-chunk 0 256 1024 --rounds 3   # A/B/C/A/B/C...

Batches are synthetic QM9-sized molecules (se3jax.benchmarking); throughput is the median over
timed steps after warm-up; compile time is reported separately. ``--rounds N`` compiles every
setting first, then times them round-robin N times (load from other processes then falls on
all settings alike). Peak RSS is the process's high-water mark (compiles included): it belongs
to one setting only when a run measures one setting. ``--loader`` measures padded
batches per second from the cached QM9 dataset in this one process (no device work).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from se3jax.benchmarking import TABLE_HEADER, Setting, format_row, interleaved, measure  # noqa: E402
from se3jax.execution import KERNELS, REMAT_CHOICES, Execution, FuseLevel  # noqa: E402
from se3jax.host_memory import peak_rss_bytes, restart_with_training_allocator  # noqa: E402
from se3jax.precision import TRAINING_POLICIES  # noqa: E402


def loader_throughput(
    batch_size: int, seconds: float = 5.0, cache_dir: str = "", max_molecules: int | None = None
) -> dict:
    """Padded training batches per second from the cached QM9 dataset (one host process)."""
    from se3jax.data.loader import BatchLoader, budget_for
    from se3jax.data.qm9 import DEFAULT_CACHE_DIR, load_qm9

    start = time.perf_counter()
    dataset = load_qm9(cache_dir or DEFAULT_CACHE_DIR, "homo", max_molecules)
    load_s = time.perf_counter() - start
    train = dataset.splits["train"]
    loader = BatchLoader(dataset, train, batch_size, budget_for(dataset, train, batch_size))
    batches = molecules = 0
    start = time.perf_counter()
    for epoch in itertools.count():
        for batch in loader.epoch_batches(epoch):
            batches += 1
            molecules += int(np.count_nonzero(batch.n_node)) - 1  # less the padding graph
            if time.perf_counter() - start > seconds:
                break
        if time.perf_counter() - start > seconds:
            break
    elapsed = time.perf_counter() - start
    return {
        "batch_size": batch_size,
        "dataset_load_s": load_s,
        "batches_per_s": batches / elapsed,
        "molecules_per_s": molecules / elapsed,
    }


def main(argv=None, as_script: bool = False) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fuse-level", nargs="+", default=["auto"], choices=[l.value for l in FuseLevel])
    parser.add_argument("--precision", nargs="+", default=["fp32"], choices=TRAINING_POLICIES)
    parser.add_argument(
        "--edge-chunk", nargs="+", type=int, default=[0], help="edges per chunk; 0 = the execution plan's choice"
    )
    parser.add_argument("--radial-memory-mb", nargs="+", type=int, default=[Execution().radial_memory_mb])
    parser.add_argument("--low-memory", default="off", choices=["off", "on", "both"])
    parser.add_argument(
        "--remat",
        nargs="+",
        default=["auto"],
        choices=REMAT_CHOICES,
        help="recompute the per-edge radial weights in the backward pass",
    )
    parser.add_argument(
        "--kernel",
        nargs="+",
        default=["auto"],
        choices=KERNELS,
        help="how the radial weights are contracted (se3jax.execution.resolve_kernel)",
    )
    parser.add_argument(
        "--edges",
        nargs="+",
        default=["paired"],
        choices=["paired", "unpaired"],
        help="paired: radial weights once per bond (the QM9 pipeline's layout)",
    )
    parser.add_argument(
        "--precompute-bases", action="store_true", help="feed precomputed edge harmonics (config.precompute_bases)"
    )
    parser.add_argument("--mode", nargs="+", default=["train", "infer"], choices=["train", "infer"])
    parser.add_argument("--batch-size", nargs="+", type=int, default=[100])
    parser.add_argument("--num-layers", type=int, default=7, help="attention layers (QM9 model: 7)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--rounds", type=int, default=0, help="time all settings round-robin this many times (--steps each)"
    )
    parser.add_argument(
        "--rotations", type=int, default=0, help="also measure the invariance error over this many random rotations"
    )
    parser.add_argument("--loader", action="store_true", help="measure the QM9 input pipeline instead")
    parser.add_argument("--cache-dir", default="", help="with --loader: the processed QM9 cache folder")
    parser.add_argument("--json", help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if as_script and not args.loader and set(args.mode) == {"train"}:
        restart_with_training_allocator()  # as the training entry point does (se3jax.host_memory)

    if args.loader:
        results = [loader_throughput(b, cache_dir=args.cache_dir) for b in args.batch_size]
        for r in results:
            print(
                f"loader, batch {r['batch_size']}: {r['batches_per_s']:,.1f} batches/s, "
                f"{r['molecules_per_s']:,.0f} molecules/s (dataset loaded in {r['dataset_load_s']:.2f} s)"
            )
    else:
        on_off = {"off": [False], "on": [True], "both": [False, True]}
        print(f"backend={jax.default_backend()} devices={jax.devices()} jax={jax.__version__}", flush=True)
        print(TABLE_HEADER, flush=True)
        settings = []
        for mode, batch, level, precision, chunk, cap, low, remat, kernel, edges in itertools.product(
            args.mode,
            args.batch_size,
            args.fuse_level,
            args.precision,
            args.edge_chunk,
            args.radial_memory_mb,
            on_off[args.low_memory],
            args.remat,
            args.kernel,
            args.edges,
        ):
            execution = Execution(
                fuse_level=level,
                precision=precision,
                edge_chunk=chunk,
                radial_memory_mb=cap,
                low_memory=low,
                remat=remat,
                kernel=kernel,
                paired_edges=edges == "paired",
            )
            settings.append(
                Setting(
                    mode=mode,
                    batch_size=batch,
                    num_layers=args.num_layers,
                    execution=execution,
                    precompute_bases=args.precompute_bases,
                )
            )
        if args.rounds:
            results = interleaved(settings, args.rounds, args.steps, args.warmup)
            for r in results:
                r["peak_rss_bytes"] = peak_rss_bytes()
                print(format_row(r), flush=True)
        else:
            results = []
            for setting in settings:
                results.append(measure(setting, args.steps, args.warmup, args.rotations))
                print(format_row(results[-1]), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(as_script=True))
