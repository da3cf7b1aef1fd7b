"""The README's usage examples run as written (with the workdir replaced by a trained one)."""

import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def example(kind: str) -> str:
    match = re.search(rf"<!-- README example: {kind} .*?-->\n```\w+\n(.*?)```", README, re.S)
    assert match, f"README has no {kind} example"
    return match.group(1)


def test_python_example_runs(trained_workdir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = example("python").replace('"runs/qm9"', repr(str(trained_workdir)))
    exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
    assert (tmp_path / "homo.jaxexport").exists()


def test_shell_example_runs(trained_workdir, tmp_path):
    script = (
        example("shell")
        .replace("runs/qm9", str(trained_workdir))
        .replace("scripts/predict.py", str(REPO / "scripts" / "predict.py"))
        .replace("python3 ", f"{sys.executable} ")
    )
    result = subprocess.run(["bash", "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "water" in result.stdout and "homo (eV)" in result.stdout
    assert "water" in (tmp_path / "predictions.csv").read_text()
