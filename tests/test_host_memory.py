"""Host memory: the allocator restart of training processes (se3jax.host_memory)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from se3jax.host_memory import TRAINING_TUNABLES, training_allocator_environment

REPO = Path(__file__).resolve().parents[1]
ALL = ":".join(f"{k}={v}" for k, v in TRAINING_TUNABLES.items())


@pytest.fixture
def thp_madvise(tmp_path):
    path = tmp_path / "enabled"
    path.write_text("always [madvise] never\n")
    return str(path)


def test_training_allocator_environment_adds_what_is_missing_once(thp_madvise, tmp_path, monkeypatch):
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.36"))
    env = training_allocator_environment({"PATH": "/bin"}, thp_madvise)
    assert env == {"PATH": "/bin", "GLIBC_TUNABLES": ALL}
    assert "glibc.malloc.hugetlb=1" in ALL
    # the user's tunables are kept, their own value of one of ours too
    env = training_allocator_environment(
        {"GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0"}, thp_madvise
    )
    mmap = f"glibc.malloc.mmap_threshold={TRAINING_TUNABLES['glibc.malloc.mmap_threshold']}"
    assert env["GLIBC_TUNABLES"] == f"glibc.malloc.arena_max=2:glibc.malloc.hugetlb=0:{mmap}"
    # nothing left to add (also: the restarted process itself), turned off, or no use: no restart
    assert training_allocator_environment(env, thp_madvise) is None
    assert training_allocator_environment({"SE3JAX_TRAINING_ALLOCATOR": "0"}, thp_madvise) is None
    never = tmp_path / "never"
    never.write_text("always madvise [never]\n")
    assert training_allocator_environment({}, str(never)) is None
    assert training_allocator_environment({}, str(tmp_path / "missing")) is None
    monkeypatch.setattr("platform.libc_ver", lambda: ("glibc", "2.34"))
    assert training_allocator_environment({}, thp_madvise) is None
    monkeypatch.setattr("platform.libc_ver", lambda: ("", ""))
    assert training_allocator_environment({}, thp_madvise) is None


def _clean_environment() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", "SE3JAX_TRAINING_ALLOCATOR")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    return env


needs_restart = pytest.mark.skipif(
    training_allocator_environment(_clean_environment()) is None, reason="no glibc 2.35+ with huge pages here"
)


@needs_restart
def test_restart_runs_the_same_command_once_with_the_tunable():
    program = (
        "import os, sys\n"
        "from se3jax.host_memory import restart_with_training_allocator\n"
        "print('start', sys.argv[1:], flush=True)\n"
        "restart_with_training_allocator()\n"
        "print('tunables', os.environ.get('GLIBC_TUNABLES'), sys.argv[1:])\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program, "a", "--b=1"], env=_clean_environment(), capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        "start ['a', '--b=1']",
        "start ['a', '--b=1']",
        f"tunables {ALL} ['a', '--b=1']",
    ]


@needs_restart
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
    assert done.stdout.strip() == f"restart False {ALL} True"
