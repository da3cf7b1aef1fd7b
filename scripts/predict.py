"""Predict a trained model's property for molecules in .xyz / .sdf files.

    python scripts/predict.py WORKDIR molecules.xyz more.sdf --csv out.csv --json out.json

WORKDIR is a training workdir (train/main.py --workdir). Bonds are inferred from the
geometry as for the training data. Molecules that cannot be read are reported on stderr with
their file and position, and the rest are still predicted. A molecule outside what the model
was trained on (more atoms than its largest training molecule, an element or bond never seen)
is predicted with a warning in the table's last column (and in the CSV and JSON). Exit status: 0 all predicted,
1 some molecules failed, 2 nothing could be predicted.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from se3jax.compilation_cache import use_compilation_cache  # noqa: E402
from se3jax.inference import load_predictor, predict_files  # noqa: E402
from se3jax.precision import TRAINING_POLICIES  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdir", type=Path)
    parser.add_argument("files", nargs="+", type=Path)
    parser.add_argument("--batch-size", type=int, default=100, help="molecules per padded batch")
    parser.add_argument(
        "--precision", default=None, choices=TRAINING_POLICIES, help="compute precision (default: the training run's)"
    )
    parser.add_argument("--csv", type=Path, help="write the predictions as CSV")
    parser.add_argument("--json", type=Path, help="write the predictions (and errors) as JSON")
    parser.add_argument("--quiet", action="store_true", help="no table, no progress bar")
    args = parser.parse_args(argv)
    use_compilation_cache()  # the next prediction at this batch size loads the compiled model

    try:
        predictor = load_predictor(args.workdir, precision=args.precision, batch_size=args.batch_size)
    except (FileNotFoundError, RuntimeError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    predictions, errors = predict_files(predictor, args.files, args.batch_size, progress=not args.quiet)
    column = f"{predictor.task} ({predictor.unit})"
    if not args.quiet and predictions:
        width = max(len(p.name) for p in predictions)
        print(f"{'molecule':{width}}  atoms  {column:>14}  warnings (outside the training domain)")
        for p in predictions:
            print(f"{p.name:{width}}  {p.num_atoms:5d}  {p.value:14.6g}  {'; '.join(p.warnings)}".rstrip())
    for error in errors:
        print(f"error: {error}", file=sys.stderr)
    rows = [dataclasses.asdict(p) for p in predictions]
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["source", "index", "name", "num_atoms", "value", "warnings"])
            writer.writeheader()
            writer.writerows({**row, "warnings": "; ".join(row["warnings"])} for row in rows)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "task": predictor.task,
                    "unit": predictor.unit,
                    "predictions": rows,
                    "errors": [dataclasses.asdict(e) for e in errors],
                },
                indent=2,
            )
        )
    if not predictions:
        return 2
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
