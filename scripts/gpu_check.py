"""One-call device check: rotation invariance of every precision policy on the device, and the
benchmark table -- the ``auto`` execution plan next to the settings it rejected -- for training
at batch 240 and 1000 and inference at batch 1600, with a profile of the training step.

    python scripts/gpu_check.py --out gpu_check                 # one GPU: about 6 minutes
    python scripts/gpu_check.py --tiny --out /tmp/gpu_check     # any machine, a tiny model (the test)
    python scripts/gpu_check.py --out gpu_check --qm9-cache data/ --qm9-molecules 30000
                                                                # + the real QM9 training loop

Rows run in priority order and stop starting once ``--time-budget`` seconds are spent (the
rest are listed as skipped). Writes ``results.json`` (every row as measured, rewritten after
each row, so a run cut short keeps what it measured) and ``results.md`` (markdown tables with
the device name and JAX version), and prints the table last.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from se3jax.benchmarking import TABLE_HEADER, Setting, format_row, measure  # noqa: E402
from se3jax.execution import Execution  # noqa: E402

TRAIN_SMALL, TRAIN_LARGE, INFER = 240, 1000, 1600
TINY_BATCHES = {TRAIN_SMALL: 8, TRAIN_LARGE: 16, INFER: 24}
KERNEL_ROWS = tuple(
    [("train", TRAIN_SMALL, p) for p in ("bf16", "tf32", "fp32")]
    + [("train", TRAIN_LARGE, p) for p in ("bf16", "tf32")]
    + [("infer", INFER, p) for p in ("bf16", "tf32", "fp32")]
)


def settings(tiny: bool) -> list[tuple[str, Setting, dict]]:
    """(section, setting, measure options) in priority order."""
    model = dict(num_layers=1, num_channels=8, num_heads=2) if tiny else {}
    b = (lambda n: TINY_BATCHES[n]) if tiny else (lambda n: n)

    def row(mode, batch, **execution):
        return Setting(mode=mode, batch_size=b(batch), execution=Execution(**execution), **model)

    rows = []
    for precision in ("fp32", "tf32", "bf16", "fp16"):  # invariance on the device, per policy
        rows.append(("auto", row("infer", INFER, precision=precision), {"rotations": 3}))
    for precision in ("bf16", "tf32", "fp32", "fp16"):
        options = {"profile": True} if precision == "bf16" else {}
        rows.append(("auto", row("train", TRAIN_SMALL, precision=precision), options))
    for precision in ("bf16", "tf32"):
        rows.append(("auto", row("train", TRAIN_LARGE, precision=precision), {}))
    rejected = [
        row("train", TRAIN_SMALL, precision="bf16", remat="on"),
        row("train", TRAIN_SMALL, precision="tf32", remat="on"),
        row("infer", INFER, precision="bf16", fuse_level="full"),
        row("infer", INFER, precision="bf16", fuse_level="none"),
        row("train", TRAIN_LARGE, precision="bf16", radial_memory_mb=1024),
        row("train", TRAIN_LARGE, precision="bf16", radial_memory_mb=512),
        row("train", TRAIN_SMALL, precision="bf16", fuse_level="none"),
        row("train", TRAIN_SMALL, precision="bf16", fuse_level="full"),
        row("train", TRAIN_SMALL, precision="bf16", fuse_level="partial_in"),
        row("infer", INFER, precision="bf16", radial_memory_mb=1024),
        row("train", TRAIN_LARGE, precision="bf16", remat="off"),
        row("train", TRAIN_SMALL, precision="tf32", fuse_level="none"),
    ]
    rows += [("rejected", s, {}) for s in rejected]
    # the fused Pallas kernel and the channels-last einsums (the CPU's choice) next to XLA's
    # einsums at the GPU plan's fusion level, side by side: --only "partial_out xla" "partial_out
    # pallas" runs exactly these
    for mode, batch, precision in KERNEL_ROWS:
        for kernel in ("xla", "xla_channels_last", "pallas"):
            rows.append(("kernel", row(mode, batch, precision=precision, fuse_level="partial_out", kernel=kernel), {}))
    # fp16 vs bf16: is it the loss-scale bookkeeping?
    rows.append(("fp16", dataclasses.replace(row("train", TRAIN_SMALL, precision="fp16"), loss_scaling=False), {}))
    return rows


def qm9_loop(cache_dir: str, molecules: int, workdir: str, tiny: bool) -> dict:
    """The real training loop on QM9 (bf16, batch 240, auto plan): steady molecules/s from
    metrics.jsonl (windows after the first, which holds compilation)."""
    from se3jax.training.config import load_config_file
    from se3jax.training.train import train_and_evaluate
    from se3jax.training.workdir import METRICS_FILE

    config = load_config_file(Path(__file__).resolve().parents[1] / "configs" / ("test.py" if tiny else "qm9.py"))
    config.cache_dir = cache_dir
    config.max_molecules = molecules
    config.precision = "bf16"
    config.num_epochs = 1
    config.max_eval_molecules = 480 if not tiny else 32
    config.progress_bar = False
    if tiny:
        config.max_train_molecules = 64
    else:
        config.batch_size = TRAIN_SMALL
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    rows = [json.loads(line) for line in Path(workdir, METRICS_FILE).read_text().splitlines()]
    rates = [r["molecules_per_s"] for r in rows if "molecules_per_s" in r][1:]
    rates.sort()
    return {
        "section": "qm9",
        "label": f"QM9 training loop, bf16 batch {config.batch_size}",
        "steps": result["step"],
        "wall_s": time.perf_counter() - start,
        "molecules_per_s": rates[len(rates) // 2] if rates else float("nan"),
        "val_mae": result.get("val_mae"),
    }


def markdown(results: list[dict], header: str) -> str:
    lines = [header, ""]
    for section, title in (
        ("auto", "The auto plan"),
        ("rejected", "Settings the plan rejected"),
        ("fp16", "fp16 without loss scaling"),
    ):
        rows = [r for r in results if r.get("section") == section and "molecules_per_s" in r]
        if rows:
            lines += [f"#### {title}", "", TABLE_HEADER] + [format_row(r) for r in rows] + [""]
    for r in results:
        if r.get("section") == "qm9":
            lines.append(f"{r['label']} (auto plan): {r['molecules_per_s']:,.0f} molecules/s over {r['steps']} steps")
        if "profile" in r:
            p = r["profile"]
            lines += [
                "",
                f"#### Where the time goes ({r['label']}: {p['step_s'] * 1e3:.1f} ms per step, "
                f"device busy {p['device_busy_s'] * 1e3:.1f} ms)",
                "",
                "| op class | ms per step | share of step |",
                "|---|---:|---:|",
            ]
            lines += [f"| {name} | {s * 1e3:.2f} | {s / p['step_s']:.0%} |" for name, s in p["classes"].items()]
            lines.append(f"| host / idle | {p['host_or_idle_s'] * 1e3:.2f} | {p['host_or_idle_s'] / p['step_s']:.0%} |")
    skipped = [r["label"] for r in results if r.get("skipped")]
    if skipped:
        lines += ["", "Skipped (time budget): " + "; ".join(skipped)]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="folder for results.json and results.md")
    parser.add_argument("--tiny", action="store_true", help="a 1-layer model on small batches (CPU test)")
    parser.add_argument("--time-budget", type=float, default=330.0, help="seconds after which no new row is started")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--only", nargs="+", default=[], help="run only rows whose label contains one of these strings")
    parser.add_argument("--qm9-cache", default="", help="a processed QM9 cache folder: also run the real loop")
    parser.add_argument("--qm9-molecules", type=int, default=0, help="the cache's max_molecules")
    args = parser.parse_args(argv)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    device = jax.devices()[0]
    header = (
        f"### {device.device_kind} ({jax.default_backend()}, {jax.device_count()} device(s)), JAX {jax.__version__}"
    )
    print(header, flush=True)
    start = time.perf_counter()
    results: list[dict] = []

    def save():
        (out / "results.json").write_text(
            json.dumps(
                {
                    "device": device.device_kind,
                    "backend": jax.default_backend(),
                    "jax": jax.__version__,
                    "elapsed_s": time.perf_counter() - start,
                    "rows": results,
                },
                indent=2,
                default=str,
            )
        )
        (out / "results.md").write_text(markdown(results, header))

    steps, warmup = (2, 1) if args.tiny else (args.steps, args.warmup)
    for section, setting, options in settings(args.tiny):
        if args.only and not any(text in setting.label for text in args.only):
            continue
        if time.perf_counter() - start > args.time_budget:
            results.append({"section": section, "label": setting.label, "skipped": True})
            continue
        try:
            with tempfile.TemporaryDirectory() as trace_dir:
                r = measure(
                    setting,
                    steps,
                    warmup,
                    options.get("rotations", 0),
                    profile_dir=trace_dir if options.get("profile") else None,
                )
        except Exception as error:  # one failing row must not lose the others
            r = {"label": setting.label, "error": f"{type(error).__name__}: {error}"}
            print(f"| {setting.label} | failed: {r['error'][:300]} |", flush=True)
        else:
            print(format_row(r), flush=True)
        r["section"] = section
        results.append(r)
        save()
    if args.qm9_cache:
        with tempfile.TemporaryDirectory() as workdir:
            results.append(qm9_loop(args.qm9_cache, args.qm9_molecules, workdir, args.tiny))
        print(results[-1], flush=True)
    save()
    print("\n" + (out / "results.md").read_text())
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
    sys.exit(main())
