"""Host memory: the huge-page restart of training processes (se3jax.host_memory)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from se3jax.host_memory import HUGE_PAGES_TUNABLE, huge_pages_environment

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def thp_madvise(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    return str(path)


def test_huge_pages_environment_adds_the_tunable_once(thp_madvise, tmp_path, monkeypatch):
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    env = huge_pages_environment({"PATH": "/bin"}, thp_madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": HUGE_PAGES_TUNABLE}
    # the user's other tunables are kept
    env = huge_pages_environment({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, thp_madvise)
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:{HUGE_PAGES_TUNABLE}"
    # already set (also: the restarted process itself), turned off, or not available: no restart
    assert huge_pages_environment(env, thp_madvise) is None
    assert huge_pages_environment({"SE3JAX_HUGE_PAGES": "0"}, thp_madvise) is None
    never = tmp_path / "never"
    never.write_text("always madvise [never]\n")
    assert huge_pages_environment({}, str(never)) is None
    assert huge_pages_environment({}, str(tmp_path / "missing")) is None
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.34"))
    assert huge_pages_environment({}, thp_madvise) is None
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert huge_pages_environment({}, thp_madvise) is None


def _clean_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SE3JAX_HUGE_PAGES")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


needs_huge_pages = pytest.mark.skipif(
    huge_pages_environment(_clean_environment()) is None, reason="no glibc 2.35+ with transparent huge pages here"
)


@needs_huge_pages
def test_restart_runs_the_same_command_once_with_the_tunable():
    program = (
        "import os, sys\n"
        "from se3jax.host_memory import restart_with_huge_pages\n"
        "print('start', sys.argv[1:], flush=True)\n"
        "restart_with_huge_pages()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, "a", "--b=1"], env=_clean_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "start ['a', '--b=1']",
        "start ['a', '--b=1']",
        f"tunables {HUGE_PAGES_TUNABLE} ['a', '--b=1']",
    ]


@needs_huge_pages
def test_training_entry_point_restarts_before_importing_jax():
    # os.execve replaced: the first process reports what it had loaded when it would restart
    program = (
        "import os, runpy, sys\n"
        "def execve(path, args, env):\n"
        "    print('restart', 'jax' in sys.modules, env['GLIBC_TUNABLES'], args[1:] == sys.orig_argv[1:])\n"
        "    sys.exit(0)\n"
        "os.execve = execve\n"
        "sys.argv = ['train/main.py', '--help']\n"
        "runpy.run_path('train/main.py', run_name='__main__')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program], cwd=REPO, env=_clean_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"restart False {HUGE_PAGES_TUNABLE} True"
