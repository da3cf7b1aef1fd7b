"""Which radius-graph builder wins where: the all-pairs builder, the cell list under jit, vesin
under jit (a host callback) and vesin on the host, on periodic boxes of random points at a
liquid's density.

    python3 scripts/neighbour_lists.py --sizes 1000 10000 100000 --density 0.1 --cutoff 5

Prints one row per (size, builder): seconds per call after compilation (best of --repeats),
edges found, and writes the table as JSON (--out). The all-pairs builder has no periodic
images: it runs on the same points as an open system, for its cost only, and is skipped above
--max-all-pairs points (its [N, N] matrix).
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from se3jax.neighbours import cell_list_radius_graph, host_radius_graph
from se3jax.point_clouds import radius_graph


def best_time(fn, repeats: int) -> tuple[float, float]:
    """Best wall-clock seconds and the process CPU seconds of that call (on a busy machine the
    CPU seconds, divided by the threads used, estimate the wall time of an idle one)."""
    times = []
    for _ in range(repeats):
        start, cpu = time.perf_counter(), time.process_time()
        jax.block_until_ready(fn())
        times.append((time.perf_counter() - start, time.process_time() - cpu))
    return min(times)


def measure(
    size: int, density: float, cutoff: float, max_neighbours: int, bin_capacity: int, repeats: int, max_all_pairs: int
):
    rng = np.random.default_rng(0)
    side = (size / density) ** (1 / 3)
    cell = np.eye(3) * side
    points = rng.uniform(0, side, size=(size, 3)).astype(np.float32)

    def row(builder: str, build, **extra) -> dict:
        graph = jax.block_until_ready(build())  # (compiles a jitted builder)
        timing = best_time(build, repeats)
        return dict(builder=builder, points=size, timing=timing, edges=int(graph.mask.sum()),
                    overflow=int(graph.overflow), **extra)  # fmt: skip

    cell_list = jax.jit(
        lambda p: cell_list_radius_graph(p, cutoff, max_neighbours, cell=cell, pbc=True, bin_capacity=bin_capacity)
    )
    start = time.perf_counter()
    jax.block_until_ready(cell_list(points))
    rows = [row("cell_list_jit", lambda: cell_list(points), compile_seconds=time.perf_counter() - start)]
    in_jit = jax.jit(lambda p: host_radius_graph(p, cutoff, max_neighbours, cell=cell, pbc=True))
    rows.append(row("vesin_in_jit", lambda: in_jit(points)))
    rows.append(row("vesin_host", lambda: host_radius_graph(points, cutoff, max_neighbours, cell=cell, pbc=True)))
    if size <= max_all_pairs:
        dense = jax.jit(lambda p: radius_graph(p, cutoff, max_neighbours))
        rows.append(row("all_pairs_jit_open", lambda: dense(points)))
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--density", type=float, default=0.1, help="points per A^3 (liquid water: 0.1)")
    parser.add_argument("--cutoff", type=float, default=5.0)
    parser.add_argument("--max-neighbours", type=int, default=96)
    parser.add_argument("--bin-capacity", type=int, default=44, help="cell list (32 overflows at 10^4 points)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-all-pairs", type=int, default=10000)
    parser.add_argument("--out", default=None, help="write the rows as JSON here")
    args = parser.parse_args()
    rows = []
    print(f"{'builder':>20} {'points':>8} {'seconds':>9} {'cpu s':>9} {'edges':>10} {'overflow':>8}")
    for size in args.sizes:
        for row in measure(
            size, args.density, args.cutoff, args.max_neighbours, args.bin_capacity, args.repeats, args.max_all_pairs
        ):
            row["seconds"], row["cpu_seconds"] = row.pop("timing")
            b, p, t, c, e, o = (row[k] for k in ("builder", "points", "seconds", "cpu_seconds", "edges", "overflow"))
            print(f"{b:>20} {p:>8} {t:>9.4f} {c:>9.4f} {e:>10} {o:>8}", flush=True)
            rows.append(row)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
