"""Data-parallel scaling: the training step on 1, 2 and 4 devices (simulated CPU devices here,
real ones on a multi-GPU machine) at a fixed batch per device, and the arithmetic of the
gradient all-reduce against the step time for larger machines.

    python scripts/scaling.py                       # CPU: 1, 2, 4 simulated devices
    python scripts/scaling.py --devices 1 8 --batch-size 240 --precision bf16   # a DGX

Each device count runs in its own process (the simulated device count is fixed at start).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

WORKER = r"""
import json, statistics, sys, time
sys.path.insert(0, {repo!r})
import jax, numpy as np, optax
from se3jax.execution import Execution
from se3jax.model import SE3TransformerPooled
from se3jax.testing import synthetic_batch
from se3jax.training.parallel import DataParallel
from se3jax.training.steps import create_train_state
devices, batch_size, steps, precision = {devices}, {batch_size}, {steps}, {precision!r}
model = SE3TransformerPooled(execution=Execution(precision=precision))
optimizer = optax.adamw(2e-3, weight_decay=0.1)
batches = [synthetic_batch(np.random.default_rng(d), batch_size) for d in range(devices)]
stacked = batches[0] if devices == 1 else jax.tree.map(lambda *x: np.stack(x), *batches)
state = create_train_state(model, optimizer, batches[0], jax.random.PRNGKey(0))
parallel = DataParallel(model, devices)
state, batch = parallel.put_replicated(state), parallel.put_batch(stacked)
start = time.perf_counter()
state, metrics = parallel.train_step(state, batch)
jax.block_until_ready(metrics)
compile_s = time.perf_counter() - start
times = []
for _ in range(steps):
    start = time.perf_counter()
    state, metrics = parallel.train_step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
parameters = int(sum(x.size for x in jax.tree.leaves(state.params)))
print(json.dumps(dict(devices=devices, step_s=statistics.median(times), compile_s=compile_s,
                      backend=jax.default_backend(), parameters=parameters)))
"""


def measure(devices: int, batch_size: int, steps: int, precision: str) -> dict:
    env = dict(os.environ)
    if "--xla_force_host_platform_device_count" not in env.get("XLA_FLAGS", ""):
        env["XLA_FLAGS"] = f"{env.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}".strip()
    code = WORKER.format(repo=str(REPO), devices=devices, batch_size=batch_size, steps=steps, precision=precision)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--batch-size", type=int, default=8, help="molecules per device")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--precision", default="fp32")
    parser.add_argument("--json")
    args = parser.parse_args(argv)
    rows = [measure(d, args.batch_size, args.steps, args.precision) for d in args.devices]
    base = rows[0]["step_s"] / rows[0]["devices"]
    print("| devices | step (s) | molecules/s | per-device step vs 1 device |\n|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['devices']} | {r['step_s']:.3f} | {r['devices'] * args.batch_size / r['step_s']:.1f} | "
            f"{r['step_s'] / r['devices'] / base:.2f}x |"
        )
    gradient_mb = rows[0]["parameters"] * 4 / 1e6
    print(
        f"\nall-reduce per step: {rows[0]['parameters']:,} float32 gradients = {gradient_mb:.1f} MB; a ring "
        f"all-reduce over D devices moves 2 (D - 1) / D x {gradient_mb:.1f} MB through each device's link"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
