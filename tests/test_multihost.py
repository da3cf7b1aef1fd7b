"""Two processes on localhost, each with 2 simulated CPU devices and gloo collectives, train
the tiny config on real QM9 molecules through JAX's distributed runtime, and are checked
against one process with 4 devices fed the same global batches.

What must hold: each epoch's molecules are split over processes and devices with no overlap
and none lost; parameters are bit-identical across processes after every step; losses and
evaluation metrics equal the single-process run's; exactly one process writes each file;
after a process dies the other stops with a clear error, and a restart of both resumes at the
exact saved position and ends where an uninterrupted run ends; processes started with different
configs are refused.
"""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WORKER = REPO / "tests" / "multihost_worker.py"
pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="gloo CPU collectives: Linux"),
    pytest.mark.xdist_group("test_multihost"),  # one worker: the runs fixture is built once
]

# 2 steps per epoch: 128 training molecules in global batches of 4 devices x 16
RUN = dict(
    max_train_molecules=128,
    max_eval_molecules=48,
    num_epochs=2,
    log_every_steps=1,
    checkpoint_every_steps=1,
    num_devices=2,
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def launch(tmp_path, name, cache, processes=2, devices=2, overrides=None, per_process=None, hang=None):
    """Start the worker processes of one run; returns (procs, record files). ``hang``:
    ``{process: step}``, that process stops responding after recording that step."""
    port = free_port()
    procs, records = [], []
    for pid in range(processes):
        config = {**RUN, "cache_dir": str(cache), "num_devices": devices, **(overrides or {})}
        if processes > 1:
            config.update(
                distributed=True,
                coordinator_address=f"localhost:{port}",
                num_processes=processes,
                process_id=pid,
                heartbeat_timeout_s=10,
            )
        config.update((per_process or {}).get(pid, {}))
        record = tmp_path / f"{name}_{pid}.jsonl"
        spec = {"devices": devices, "config": config, "workdir": str(tmp_path / name), "record": str(record)}
        spec["hang_after_step"] = (hang or {}).get(pid)
        procs.append(
            subprocess.Popen(
                [sys.executable, str(WORKER), json.dumps(spec)],
                cwd=REPO,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
        )
        records.append(record)
    return procs, records


def finish(procs, timeout=240):
    outputs = [p.communicate(timeout=timeout) for p in procs]
    return [(p.returncode, err) for p, (_, err) in zip(procs, outputs)]


def read(record):
    return [json.loads(line) for line in Path(record).read_text().splitlines()] if Path(record).exists() else []


def metrics(workdir, key):
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r[key]) for r in rows if key in r]


def finished_checkpoints(workdir) -> list[int]:
    """Steps whose (background) save has finished: orbax writes the metadata file last."""
    saved = (workdir / "checkpoints").glob("*/_CHECKPOINT_METADATA")
    return sorted(int(p.parent.name) for p in saved if p.parent.name.isdigit())  # not a temporary folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory, qm9_subset_cache):
    """One process with 4 devices; alongside it the two-process run, whose process 1 stops
    responding after step 3 and is killed once step 2's checkpoint is finished, and which is
    then restarted (both processes) and trained to the end. Returns the folder, the records and
    what the kill and the restart printed."""
    tmp = tmp_path_factory.mktemp("multihost")
    one, one_records = launch(tmp, "one", qm9_subset_cache, processes=1, devices=4, overrides={"num_devices": 4})
    two, two_records = launch(tmp, "two", qm9_subset_cache, hang={1: 3})
    ready = lambda: (
        any(r["kind"] == "step" and r["step"] == 3 for r in read(two_records[1]))  # process 1 hangs
        and 2 in finished_checkpoints(tmp / "two")
    )
    deadline = time.time() + 600
    while time.time() < deadline and not ready():
        assert all(p.poll() is None for p in two), finish(two)
        time.sleep(0.2)
    if not ready():
        for p in two + one:
            p.kill()
        pytest.fail(f"process 1 did not hang after step 3 with step 2 saved: {finish(two)}")
    two[1].send_signal(signal.SIGKILL)
    start = time.time()
    (survivor_code, survivor_err), _ = finish(two, timeout=120)
    kill = dict(code=survivor_code, err=survivor_err, seconds=time.time() - start)
    restarted, _ = launch(tmp, "two", qm9_subset_cache)
    restart = finish(restarted + one)
    for code, err in restart:
        assert code == 0, err[-3000:]
    return tmp, two_records, one_records, kill, [err for _, err in restart[:2]]


def test_processes_take_disjoint_shares_of_every_epoch(qm9_subset):
    from se3jax.data.loader import BatchLoader, budget_for

    idx = qm9_subset.splits["train"][: RUN["max_train_molecules"]]
    budget = budget_for(qm9_subset, idx, 16)
    loaders = [
        BatchLoader(qm9_subset, idx, 16, budget, seed=0, num_devices=2, process_index=p, process_count=2)
        for p in range(2)
    ]
    single = BatchLoader(qm9_subset, idx, 16, budget, seed=0, num_devices=4)
    for epoch in range(2):
        shares = [np.concatenate([np.concatenate(step) for step in loader.plan(epoch)]) for loader in loaders]
        seen = np.concatenate(shares)
        assert len(seen) == len(set(seen.tolist())) == len(idx)  # no overlap, none lost
        assert set(seen.tolist()) == set(idx.tolist())
        assert all(len(s) for s in shares)  # both processes work
        assert loaders[0].num_batches(epoch) == loaders[1].num_batches(epoch)  # same step count
        # step k of the two processes together is step k of the 4-device process
        for k, step in enumerate(single.plan(epoch)):
            together = loaders[0].plan(epoch)[k] + loaders[1].plan(epoch)[k]
            assert [a.tolist() for a in together] == [a.tolist() for a in step]


def test_a_dead_process_stops_the_other_with_a_clear_error(runs):
    kill = runs[3]
    assert kill["code"] != 0 and kill["seconds"] < 60  # bounded: heartbeat timeout 10 s
    # the coordination service names the dead process, task 1 ("...(stopped sending heartbeats):
    # 1" in JAX 0.10, ".../task:1" in other versions), in the survivor's error
    assert re.search(r"stopped sending heartbeats\):?\s*(\S*task:)?1\b", kill["err"]), kill["err"][-2000:]


def test_both_processes_resume_exactly_and_match_one_process_with_four_devices(runs):
    tmp, two_records, one_records, _, restart_errs = runs
    for err in restart_errs:  # step 2 ended epoch 0: the next batch is epoch 1's first
        assert "resuming at step 2 (epoch 1, batch 0)" in err, err[-3000:]
    # every step's parameters, from both processes and both launches (steps 1-3 before the
    # kill, 3-4 after the restart): bit-identical, so the resumed step 3 is the lost one
    steps = {}
    for record in two_records:
        for r in read(record):
            if r["kind"] == "step":
                steps.setdefault(r["step"], set()).add((r["params"], r["epoch"], r["batch"]))
    assert sorted(steps) == [1, 2, 3, 4] and all(len(v) == 1 for v in steps.values()), steps
    assert [r["step"] for r in read(two_records[1]) if r["kind"] == "step"] == [1, 2, 3, 3, 4]
    two_loss, one_loss = metrics(tmp / "two", "train_loss"), metrics(tmp / "one", "train_loss")
    assert [s for s, _ in two_loss] == [s for s, _ in one_loss] == [2, 4]  # each epoch's mean, once
    np.testing.assert_allclose([v for _, v in two_loss], [v for _, v in one_loss], rtol=1e-5)
    results = [next(r for r in read(rec) if r["kind"] == "result") for rec in two_records + one_records]
    for key in ("val_mae", "test_mae"):  # aggregated over both processes
        assert results[0][key] == results[1][key]
        np.testing.assert_allclose(results[0][key], results[2][key], rtol=1e-5)


def test_exactly_one_process_writes_each_file(runs):
    tmp, two_records, *_ = runs
    written = [{r["path"] for r in read(rec) if r["kind"] == "write"} for rec in two_records]
    # config and normalisation are written to a temporary name, then renamed
    assert {"config.tmp", "normalisation.tmp", "metrics.jsonl"} <= written[0]
    assert any(p.startswith("checkpoints/4") and p.endswith("_CHECKPOINT_METADATA") for p in written[0])
    assert not written[0] & written[1], written[0] & written[1]
    # process 1 writes only orbax's per-process record of the arrays it holds
    assert written[1] and all(p.endswith("array_metadatas/process_1") for p in written[1]), written[1]
    assert sorted(int(p.name) for p in (tmp / "two" / "checkpoints").iterdir() if p.name.isdigit())[-1] == 4


def test_processes_with_different_configs_are_refused(tmp_path, qm9_subset_cache):
    procs, _ = launch(tmp_path, "mismatch", qm9_subset_cache, per_process={1: {"seed": 7}})
    for code, err in finish(procs, timeout=180):
        assert code != 0 and "seed" in err and "same config" in err, err[-2000:]
