"""The measuring scripts run end to end at a tiny scale (their numbers are for the README, not
for tests): the one-call GPU check and the input-pipeline benchmark."""

import importlib.util
import json
from pathlib import Path

import jax
import pytest

REPO = Path(__file__).resolve().parents[1]


def load_script(name):
    spec = importlib.util.spec_from_file_location(f"se3jax_script_{name}", REPO / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_tiny_on_cpu(tmp_path, capsys):
    gpu_check = load_script("gpu_check")
    assert (
        gpu_check.main(
            [
                "--tiny",
                "--out",
                str(tmp_path),
                "--time-budget",
                "120",
                "--only",
                "infer b24 fp32 auto",
                "train b8 bf16 auto",
            ]
        )
        == 0
    )
    results = json.loads((tmp_path / "results.json").read_text())
    rows = {r["label"]: r for r in results["rows"]}
    backend = jax.default_backend()
    assert results["backend"] == backend and results["jax"] == jax.__version__
    # auto resolves per backend (se3jax.execution's measured preferences): the per-path form on
    # a CPU, grouped output degrees on a GPU
    level = "none" if backend == "cpu" else "partial_out"
    infer = rows["infer b24 fp32 auto"]
    # fp32 on the device: invariant to float32 rounding (a real bug gives O(1) errors)
    assert 0 <= infer["invariance_error"] < 1e-5 and infer["molecules_per_s"] > 0
    train = rows["train b8 bf16 auto"]
    assert train["resolved_level"] == level
    # radial weights recomputed in the backward pass: always on a CPU; a tiny batch's are stored on a GPU
    assert train["resolved_remat"] is (backend == "cpu")
    assert train["total_bytes"] > 0 and train["flops"] > 0 and train["compile_s"] > 0
    assert sum(train["profile"]["classes"].values()) > 0
    assert infer["section"] == train["section"] == "auto"
    skipped = [r for r in results["rows"] if r.get("skipped")]
    assert not skipped  # --only ran exactly the rows asked for
    markdown = (tmp_path / "results.md").read_text()
    assert f"| infer b24 fp32 auto | {level} |" in markdown and "Where the time goes" in markdown
    assert "Where the time goes" in capsys.readouterr().out  # the table is printed last


def test_loader_benchmark_measures_padded_batches(qm9_subset_cache):
    benchmark = load_script("benchmark")
    result = benchmark.loader_throughput(16, seconds=0.5, cache_dir=str(qm9_subset_cache), max_molecules=400)
    # real molecules per batch: up to 16, nearly every batch full (counting the padding graph
    # as a molecule would give 17)
    per_batch = result["molecules_per_s"] / result["batches_per_s"]
    assert 12 <= per_batch <= 16 and result["batch_size"] == 16, per_batch


def test_benchmark_cli_rejects_unknown_precision():
    benchmark = load_script("benchmark")
    with pytest.raises(SystemExit):
        benchmark.main(["--precision", "fp8"])


def test_fast_recipe_script_leaves_everything_in_one_folder(qm9_subset_cache, tmp_path):
    qm9_fast = load_script("qm9_fast")
    out = tmp_path / "fast"
    overrides = [
        "max_train_molecules=32",
        "max_eval_molecules=16",
        "num_epochs=2",
        "warmup_epochs=0.5",
        "ema_decay=0.9",
    ]
    assert (
        qm9_fast.main(
            [
                "--data",
                str(qm9_subset_cache),
                "--out",
                str(out),
                "--config",
                str(REPO / "configs" / "test.py"),
                "--override",
                *overrides,
            ]
        )
        == 0
    )
    results = json.loads((out / "results.json").read_text())
    assert results["task"] == "homo" and results["epochs"] == 2 and results["step"] == 4
    assert results["val_mae"] > 0 and results["test_mae"] > 0 and results["wall_s"] > 0
    assert (out / "metrics.jsonl").read_text() and (out / "learning_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "workdir" / "checkpoints").is_dir()
