"""Render a training run's learning curves to PNG.

    python scripts/plot_metrics.py WORKDIR [--out curves.png]

Reads WORKDIR/metrics.jsonl (written by train/main.py): training loss and MAE per logged step,
validation MAE per evaluation, and throughput; the MAE axes are in the target's unit.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def read_metrics(workdir: Path) -> list[dict]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        raise SystemExit(f"error: {path} not found; is {workdir} a training workdir?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            print(f"warning: skipping unreadable line {number} of {path}", file=sys.stderr)
    return records


def series(records: list[dict], key: str):
    points = [(r["step"], r[key]) for r in records if key in r]
    return [p[0] for p in points], [p[1] for p in points]


def plot(workdir: Path, out: Path) -> Path:
    records = read_metrics(workdir)
    unit = ""
    norm = workdir / "normalisation.json"
    if norm.exists():
        info = json.loads(norm.read_text())
        unit = f" ({info['task']}, {info['unit']})"
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    steps, loss = series(records, "train_loss")
    axes[0].plot(steps, loss)
    axes[0].set(title="training loss (L1, normalised)", xlabel="step", yscale="log")
    for key, label in (("train_mae", "train"), ("val_mae", "validation"), ("test_mae", "test")):
        s, v = series(records, key)
        if s:
            axes[1].plot(s, v, "o-" if key != "train_mae" else "-", label=label, markersize=3)
    axes[1].set(title=f"MAE{unit}", xlabel="step", yscale="log")
    axes[1].legend()
    s, v = series(records, "molecules_per_s")
    axes[2].plot(s, v)
    axes[2].set(title="training throughput", xlabel="step", ylabel="molecules / s")
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("--out", type=Path, help="PNG path (default: WORKDIR/learning_curves.png)")
    args = parser.parse_args(argv)
    out = plot(args.workdir, args.out or args.workdir / "learning_curves.png")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
