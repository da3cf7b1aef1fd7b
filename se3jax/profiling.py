"""Where a step's time goes: a JAX profiler trace split by op class.

:func:`profile_compiled` runs a compiled step under ``jax.profiler.trace`` (with a Perfetto
JSON trace), reads the device's op/kernel events, maps each back to its HLO instruction and
that instruction's source scope (the ``jax.named_scope`` labels in the layers: basis,
radial_weights, tfn_contraction, gather, attention, segment_sum, norm, optimizer), and sums
the time per class. What is left of the wall time is host time (dispatch, waiting).
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import os
import re
import time

import jax

# op_name substring -> class, first match wins (scopes set in se3jax.layers and steps)
OP_CLASSES = (
    ("radial_weights", "radial product"),
    ("tfn_contraction", "TFN contraction"),
    ("basis", "basis"),
    ("gather", "gather sources"),
    ("attention", "attention"),
    ("segment_sum", "segment sums"),
    ("norm", "norms"),
    ("optimizer", "optimizer"),
    ("radial", "radial MLP"),
)

_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=.*?metadata=\{[^}]*op_name=\"([^\"]*)\"")


def hlo_op_names(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> the op_name of its metadata (also under '.' -> '_' spelling,
    which kernel names use)."""
    names = {}
    for line in hlo_text.splitlines():
        match = _INSTRUCTION.match(line)
        if match:
            names[match.group(1)] = match.group(2)
            names[match.group(1).replace(".", "_")] = match.group(2)
    return names


def classify(op_name: str) -> str:
    for key, label in OP_CLASSES:
        if key in op_name:
            return label
    return "other"


def _trace_events(logdir: str):
    files = sorted(glob.glob(os.path.join(logdir, "**", "perfetto_trace.json.gz"), recursive=True))
    if not files:
        return [], {}, {}
    with gzip.open(files[-1]) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {
        e["pid"]: e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    threads = {
        (e["pid"], e.get("tid")): e.get("args", {}).get("name", "")
        for e in events
        if e.get("ph") == "M" and e.get("name") == "thread_name"
    }
    return events, processes, threads


def profile_compiled(run, hlo_text: str, logdir: str, steps: int = 3) -> dict:
    """Trace ``steps`` calls of ``run()`` (which must block until the step is done).

    Returns ``{"step_s", "device_busy_s", "classes": {class: seconds per step}, "top_ops":
    [(op, class, seconds per step), ...]}``. On GPUs the events are the device's kernels; on
    a CPU, XLA's thunks.
    """
    run()  # warm: nothing of compilation in the trace
    with jax.profiler.trace(logdir, create_perfetto_trace=True):
        # timed inside the trace: starting and writing it takes longer than a GPU step
        start = time.perf_counter()
        for _ in range(steps):
            run()
        wall = (time.perf_counter() - start) / steps
    events, processes, threads = _trace_events(logdir)
    devices = {pid for pid, name in processes.items() if "/device:" in name and "CPU" not in name.upper()}
    # a device has several lines (kernels per stream, and derived "XLA Ops"/"XLA Modules"
    # summaries): count kernels on the streams only, so no time is counted twice
    streams = {key for key, name in threads.items() if key[0] in devices and "stream" in name.lower()}
    op_names = hlo_op_names(hlo_text)
    per_op = collections.Counter()
    lines = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e:
            continue
        args = e.get("args") or {}
        hlo_op = args.get("hlo_op") or args.get("long_name", "").split(" ")[0].lstrip("%")
        line = (e.get("pid"), e.get("tid"))
        if e.get("pid") in devices:
            lines[f"{processes.get(line[0], '')} / {threads.get(line, '')}"] += e["dur"] * 1e-6 / steps
            if streams and line not in streams:
                continue
        elif devices or not (hlo_op in op_names or e.get("name") in op_names):
            continue
        key = hlo_op if hlo_op in op_names else e.get("name", "")
        per_op[key] += e["dur"] * 1e-6 / steps  # microseconds -> seconds per step
    classes = collections.Counter()
    for op, seconds in per_op.items():
        classes[classify(op_names.get(op, op))] += seconds
    busy = sum(per_op.values())
    return {
        "step_s": wall,
        "device_busy_s": busy,
        "host_or_idle_s": max(wall - busy, 0.0),
        "device_kind": "gpu" if devices else "cpu",
        "classes": dict(classes.most_common()),
        "device_lines": dict(lines.most_common()),
        "top_ops": [(op, classify(op_names.get(op, op)), s) for op, s in per_op.most_common(25)],
    }
