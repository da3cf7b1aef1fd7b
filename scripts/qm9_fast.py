"""Run the fast QM9 recipe end to end in one call and leave everything in one folder:
``workdir/`` (checkpoints, config, metrics), ``metrics.jsonl``, ``learning_curves.png`` and
``results.json`` (validation and test MAE, wall time, device, JAX version).

    python scripts/qm9_fast.py --data data/ --out fast_homo            # configs/qm9_fast.py
    python scripts/qm9_fast.py --data data/ --out fast --tasks mu alpha homo lumo gap r2 zpve U0 U H G Cv
    python scripts/qm9_fast.py --data data/ --out smoke --config configs/test.py   # seconds, CPU

``--data`` is a folder with the portable dataset (``scripts/export_qm9.py``) or a QM9 cache.
``--override key=value`` changes any config field (e.g. ``num_epochs=20``).
"""

from __future__ import annotations

import argparse
import ast
import json
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

import jax  # noqa: E402

from se3jax.training.config import load_config_file  # noqa: E402
from se3jax.training.train import train_and_evaluate  # noqa: E402
from se3jax.training.workdir import METRICS_FILE  # noqa: E402


def parse_override(text: str):
    key, _, value = text.partition("=")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def run_task(config_path: Path, data: Path, out: Path, task: str, overrides: dict) -> dict:
    from plot_metrics import plot

    config = load_config_file(config_path)
    config.task = task
    config.cache_dir = str(data)
    config.progress_bar = False
    for key, value in overrides.items():
        config[key] = value
    workdir = out / "workdir"
    start = time.perf_counter()
    result = train_and_evaluate(config, workdir)
    wall = time.perf_counter() - start
    shutil.copy(workdir / METRICS_FILE, out / METRICS_FILE)
    plot(workdir, out / "learning_curves.png")
    summary = {
        "task": task,
        "config": str(config_path),
        "wall_s": wall,
        "device": jax.devices()[0].device_kind,
        "jax": jax.__version__,
        "epochs": config.num_epochs,
        "batch_size": config.batch_size,
        "precision": config.precision,
        **result,
    }
    (out / "results.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="portable dataset or cache folder")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--config", type=Path, default=REPO / "configs" / "qm9_fast.py")
    parser.add_argument("--tasks", nargs="+", default=["homo"])
    parser.add_argument("--override", nargs="*", default=[], help="config fields as key=value")
    args = parser.parse_args(argv)
    overrides = dict(parse_override(o) for o in args.override)
    summaries = []
    for task in args.tasks:
        out = args.out / task if len(args.tasks) > 1 else args.out
        out.mkdir(parents=True, exist_ok=True)
        summaries.append(run_task(args.config, args.data, out, task, overrides))
        s = summaries[-1]
        print(
            f"{task}: validation MAE {s.get('val_mae', float('nan')):.5g}, test MAE "
            f"{s.get('test_mae', float('nan')):.5g} in {s['wall_s']:.0f} s on {s['device']}",
            flush=True,
        )
    if len(summaries) > 1:
        (args.out / "results.json").write_text(json.dumps(summaries, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
