"""How the model executes: choices that change speed and memory, never the parameters or the
function computed.

One frozen :class:`Execution` travels down the model (passed by keyword to every layer). Its
``auto`` values are resolved here, per backend, from the measured tables below, at trace time
(when the fibers, the edge count and the backend are known):

- the **fusion level** of each convolution (:func:`resolve_fuse_level`), from a preference per
  backend and mode (training or inference);
- the **edge chunk** (:func:`edge_chunk_rows`): on a CPU, a chunk's radial weights of the whole
  layer fit a cache-sized budget, three times it in training (:func:`cpu_chunk_bytes`), and a
  chunk has at most ``CPU_MAX_CHUNK_EDGES`` edges; on a GPU, edges are not chunked
  unless one layer's per-edge radial weights would exceed ``radial_memory_mb`` (then the fewest
  even chunks that fit);
- whether the radial weights are **stored or recomputed** for the backward pass
  (:func:`remat_radial`), and which **kernel** contracts them (:func:`resolve_kernel`).

>>> Execution().precision, Execution(mode="infer").for_mode("train").mode
('fp32', 'train')
>>> resolve_fuse_level("auto", Fiber.create(4, 32), Fiber.create(4, 32), "cpu", "train").value
'none'
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import os
import subprocess
import sys

from se3jax.fiber import Fiber
from se3jax.precision import POLICIES, get_policy

MODES = ("train", "infer")
REMAT_CHOICES = ("auto", "on", "off")
KERNELS = ("auto", "xla", "xla_channels_last", "pallas")


class FuseLevel(enum.StrEnum):
    """How a convolution groups its (d_in, d_out) paths (se3jax.layers.convolution)."""

    NONE = "none"
    PARTIAL_OUT = "partial_out"
    PARTIAL_IN = "partial_in"
    FULL = "full"
    AUTO = "auto"


def _option(default, doc: str, choices: tuple | None = None, config: bool = True):
    """A field of :class:`Execution` with its documentation and valid values: the one definition
    that the class docstring, the training config's keys and defaults (``--config.<name>`` on
    the command line) and the validation read."""
    return dataclasses.field(default=default, metadata={"doc": doc, "choices": choices, "config": config})


@dataclasses.dataclass(frozen=True)
class Execution:
    """Execution options of a model. Hashable (a Flax module attribute); every field has the
    same default wherever an Execution is made. The training config takes its execution keys,
    defaults and help from these fields (:func:`se3jax.training.config.default_config`).

    Options (generated from the fields' documentation):
    """

    fuse_level: str = _option(
        "auto",
        "how a convolution groups its (d_in, d_out) paths into fused contractions; ``auto`` "
        "follows the measured preference of the backend and mode (:func:`resolve_fuse_level`).",
        tuple(level.value for level in FuseLevel),
    )
    precision: str = _option(
        "fp32",
        "``fp32`` (float32 contractions on every backend), ``tf32`` (float32 storage, the GPU's "
        "TensorFloat-32 matmul mode), ``bf16``, ``fp16`` (training with dynamic loss scaling) or "
        "``fp64`` (tests; not for training).",
        POLICIES,
    )
    edge_chunk: int = _option(0, "edges per chunk; 0 = chosen per backend (:func:`edge_chunk_rows`).")
    radial_memory_mb: int = _option(
        0,
        "on accelerators, the most memory (MB) one layer's per-edge radial weights may take before "
        "edges are chunked; 0 = the share of the device's memory that ``se3jax.execution.CHUNK_MEMORY_FRACTION`` "
        "gives the mode.",
    )
    low_memory: bool = _option(
        False,
        "also rematerialise each attention block, always recompute the radial weights, and halve the chunk budget.",
    )
    remat: str = _option(
        "auto",
        "``on`` recomputes the per-edge radial weights in the backward pass instead of storing them "
        "(they are the largest tensor of the model), ``off`` stores them, ``auto`` decides per "
        "backend and size (:func:`remat_radial`).",
        REMAT_CHOICES,
    )
    paired_edges: bool = _option(
        True,
        "edges ``2k, 2k+1`` are the two directions of one bond (what the se3jax graph builders "
        "emit); the radial weights are then computed once per bond.",
    )
    kernel: str = _option(
        "auto",
        "how a fusion group contracts its per-edge radial weights: ``xla`` (einsums), "
        "``xla_channels_last`` (einsums with the weights' output channels innermost; the backward "
        "pass recomputes them), ``pallas`` (se3jax.layers.fused_kernel: the weights never leave "
        "the chip) or ``auto`` (:func:`resolve_kernel`).",
        KERNELS,
    )
    mode: str = _option(
        "train",
        "``train`` or ``infer``: which measured preference ``auto`` follows (set by the training "
        "and inference code, not a config key).",
        MODES,
        config=False,
    )

    def __post_init__(self):
        for field in dataclasses.fields(self):
            choices = field.metadata["choices"]
            if choices is not None and getattr(self, field.name) not in choices:
                raise ValueError(f"unknown {field.name} {getattr(self, field.name)!r}; choose one of {choices}")
        if self.edge_chunk < 0 or self.radial_memory_mb < 0:
            raise ValueError(f"need edge_chunk >= 0 and radial_memory_mb >= 0: {self}")
        # a FuseLevel member and its string must give the same (hashable) Execution
        object.__setattr__(self, "fuse_level", FuseLevel(self.fuse_level).value)

    def for_mode(self, mode: str) -> Execution:
        """The same options for another mode (e.g. evaluation steps of a training run)."""
        return dataclasses.replace(self, mode=mode)

    def replace(self, **changes) -> Execution:
        return dataclasses.replace(self, **changes)


Execution.__doc__ += "".join(
    f"\n    - ``{f.name}`` (default ``{f.default!r}``): {f.metadata['doc']}" for f in dataclasses.fields(Execution)
)


def allowed_levels(fiber_in: Fiber, fiber_out: Fiber) -> tuple[FuseLevel, ...]:
    """The levels the fibers permit (fusing degrees needs equal channel counts)."""
    levels = [FuseLevel.NONE]
    if fiber_in.uniform_channels is not None and len(fiber_in.degrees) > 1:
        levels.append(FuseLevel.PARTIAL_OUT)
    if fiber_out.uniform_channels is not None and len(fiber_out.degrees) > 1:
        levels.append(FuseLevel.PARTIAL_IN)
    if (
        fiber_in.uniform_channels is not None
        and fiber_out.uniform_channels is not None
        and len(fiber_in.degrees) * len(fiber_out.degrees) > 1
    ):
        levels.append(FuseLevel.FULL)
    return tuple(levels)


# Fastest level per (backend, mode), first allowed one wins.
# CPU, 2-core AMD EPYC (Zen 4, 32 MB L3), `scripts/benchmark.py`, QM9 model, paired edges,
# fp32, chunks from the cache rule: training at batch 240 none 38.3 mol/s > partial_out 19.9;
# inference at batch 1600 none 109 > partial_out 88 (wider groups do up to 10x the
# multiply-adds of the per-path form, README "Execution plan").
# GPU, H200, `scripts/gpu_check.py` (README tables), bf16: training at batch 240
# partial_out 11,588 mol/s > none 8,789 > full 8,538 > partial_in 8,255 (tf32: partial_out
# 7,914 > none 6,674); inference at batch 1600 partial_out 57,747 > none 49,898 > full 35,418.
_PREFERENCE = {
    ("cpu", "train"): (FuseLevel.NONE,),
    ("cpu", "infer"): (FuseLevel.NONE,),
    ("gpu", "train"): (FuseLevel.PARTIAL_OUT, FuseLevel.PARTIAL_IN, FuseLevel.NONE),
    ("gpu", "infer"): (FuseLevel.PARTIAL_OUT, FuseLevel.NONE, FuseLevel.PARTIAL_IN),
}
_WIDEST_FIRST = (FuseLevel.FULL, FuseLevel.PARTIAL_OUT, FuseLevel.PARTIAL_IN, FuseLevel.NONE)


def resolve_kernel(execution: Execution, recomputed: bool, backend: str | None = None) -> str:
    """``auto`` -> ``xla_channels_last`` on a CPU in inference, and in training when the radial
    weights are recomputed for the backward pass anyway (``recomputed``: :func:`remat_radial`,
    always so by default on a CPU); else ``xla``.

    On a CPU the contraction ``msg[r, s, o, k] = sum_j R[r, o, j] t[r, s, j, k]`` ran at 3-8
    GFLOP/s with ``R`` laid out ``[o, j]`` and 2x faster with ``[j, o]`` (2-core Intel Xeon, JAX
    0.10.2, the QM9 model's hidden-layer groups in isolation); the gradients are faster in the
    first layout, so that path's backward recomputes ``R`` as ``[o, j]`` (one more radial
    product: free where the weights are rematerialised). In the QM9 model at batch 100, steps
    alternated in one process (median of paired ratios): inference 0.82 of the ``xla`` step
    time, training 0.93 (docs/performance.md). On a GPU not measured yet: ``xla``.

    The Pallas kernel runs where a setting asks for it, until a GPU measurement
    (``scripts/gpu_check.py --only "partial_out xla" "partial_out pallas"``: the kernel next to
    XLA at batch 240/1000/1600, bf16/tf32/fp32) shows it faster for a backend and fusion group;
    that choice is then made here, next to its figures. Not measured yet:
    ``scripts/check_kernel.py`` only proves it compiles for sm_90 within the register and
    shared-memory limits."""
    if execution.kernel != "auto":
        return execution.kernel
    no_stored_weights = recomputed or execution.mode == "infer"
    return "xla_channels_last" if no_stored_weights and backend_kind(backend) == "cpu" else "xla"


def backend_kind(backend: str | None = None) -> str:
    """``cpu`` or ``gpu`` (every accelerator follows the GPU table)."""
    import jax

    return "cpu" if (backend or jax.default_backend()) == "cpu" else "gpu"


def resolve_fuse_level(
    level: FuseLevel | str, fiber_in: Fiber, fiber_out: Fiber, backend: str | None = None, mode: str = "train"
) -> FuseLevel:
    """``auto`` -> the preferred allowed level for the backend and mode. A forced level the
    fibers cannot do falls back to the widest one they can: a model-wide setting must still
    work on layers with ragged fibers (the first and last)."""
    level = FuseLevel(level)
    allowed = allowed_levels(fiber_in, fiber_out)
    if level == FuseLevel.AUTO:
        preference = _PREFERENCE[(backend_kind(backend), mode)]
        return next((l for l in preference if l in allowed), FuseLevel.NONE)
    return next(l for l in _WIDEST_FIRST[_WIDEST_FIRST.index(level) :] if l in allowed)


# ---------------------------------------------------------------------------------------------
# Edge chunks

# CPU: a chunk's radial weights of the whole layer (every path of a bond row, 45,056 floats in a
# hidden layer of the QM9 model) take at most CPU_CHUNK_BYTES, or the last-level cache if it is
# smaller; the rows are split into even chunks (no mostly-padding last chunk). XLA keeps every
# fusion group's weights of a chunk live at once (inference at batch 100: 136 MB of temporaries
# with 128-edge chunks, 188 MB with 512, 375 MB with 2,080), so the whole layer is what has to
# stay in cache, not one group. Measured on the 2-core Zen 4 (32 MB L3, 1 MB L2 per core) with
# `scripts/benchmark.py --rounds 3` (settings timed round-robin; other processes kept the load
# near 20, so only the ratios mean something): inference at batch 100 by chunk (edges): 128, 256,
# 384 -> 11.1-11.2 mol/s, 512 -> 10.5, 1,024 -> 8.4, 2,080 (the rule before) -> 6.7. The rule
# gives 352 edges at batch 100, 368 at 240 and above (alone: batch 240 58.5 mol/s, the fastest
# of 128/256/368/1,024). Training takes CPU_TRAIN_CHUNK_FACTOR times more (below). Caches
# larger than the measured one are not extrapolated to: a big server L3 is shared by many cores.
CPU_CHUNK_BYTES = 32 << 20
# Training takes chunks this many times larger: each chunk also pays a fixed cost in the
# backward pass (the scan step that recomputes its weights, the radial network's parameter
# gradients summed over chunks), which larger chunks amortise. Measured alone on the 2-core
# Zen 4, fp32, `scripts/benchmark.py --mode train --rounds ...` (auto with the factor / the
# inference-sized rule / others, mol/s): batch 100: 22.8 (1,040 edges) / 18.6 (352) / 17.4
# (1,024, last chunk mostly padding) / 15.4 (2,048); batch 240: 1,024-edge chunks 15.5 against
# 13.2 with the inference-sized rule; batch 1000: 22.4 (1,088) / 16.4 (368) / 21.3 (2,048).
CPU_TRAIN_CHUNK_FACTOR = 3
# And at most this many edges per chunk, whatever the radial weights: a layer with few weights
# per edge (a model's first and last) still keeps its gathered features, bases, messages and
# their gradients for every edge of a chunk, which the weight budget does not count. Measured
# alone on the 2-core Zen 4, the trunk of `scripts/cost_vs_edges.py` (training, periodic box,
# 10^5 edges; its first and last layers unchunked or in chunks of 30,000-60,000 edges without
# the cap): no cap 6.68 s per step, 2.55 GB of XLA memory, 3.57 GB peak RSS; every layer in
# chunks of 2,048 / 4,096 / 8,192 edges: 5.97 / 5.26 / 5.73 s, 1.12 / 1.12 / 1.16 GB, 2.10 /
# 2.08 / 2.16 GB (the times within this machine's noise). 8,192 leaves the QM9 model at batch
# 100 as it was measured (its first layer, 4,160 edges, unchunked; its hidden and output layers
# take smaller chunks anyway); with 4,096 its training measured 17.6 and 16.7 mol/s against 17.9
# and 17.9 (A/B/A/B).
CPU_MAX_CHUNK_EDGES = 8192
# GPU: the per-layer radial weights stay unchunked up to this share of the device's memory
# (H200, 141 GB: 3.5 GB training / 7 GB inference; H100, 80 GB: 2 GB / 4 GB). Chunks cost
# speed: training at batch 1000 in bf16 (1.9 GB of weights per layer) measured 16,466 mol/s
# unchunked (6.2 GB), 14,133 in 2 chunks (4.4 GB), 11,493 in 4 (3.6 GB); inference at batch
# 1600 in bf16 (full level) 35,418 unchunked, 29,457 in 3 chunks (H200, README tables).
CHUNK_MEMORY_FRACTION = {"train": 0.025, "infer": 0.05}
# GPU training: the radial weights are stored for the backward pass instead of recomputed
# when one layer's take at most this share of device memory (8 layers: at most 8%).
# Measured at batch 240 in bf16: 14,164 mol/s stored (4.5 GB) against 11,588 recomputed
# (1.6 GB), H200.
STORE_MEMORY_FRACTION = 0.01
_FALLBACK_DEVICE_BYTES = 16 << 30
_FALLBACK_CACHE_BYTES = 8 << 20


@functools.cache
def last_level_cache_bytes(base: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The CPU's largest cache in bytes as the OS reports it (Linux sysfs under ``base``, macOS
    sysctl); 8 MB when it cannot be read."""
    sizes = []
    if os.path.isdir(base):
        for entry in sorted(os.listdir(base)):
            try:
                with open(os.path.join(base, entry, "size")) as f:
                    text = f.read().strip().upper()
            except OSError:
                continue
            units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
            if text and text[-1] in units and text[:-1].isdigit():
                sizes.append(int(text[:-1]) * units[text[-1]])
            elif text.isdigit():
                sizes.append(int(text))
    elif sys.platform == "darwin":
        for key in ("hw.l3cachesize", "hw.l2cachesize"):
            try:
                out = subprocess.run(["sysctl", "-n", key], capture_output=True, text=True, timeout=5)
                if out.returncode == 0 and out.stdout.strip().isdigit() and int(out.stdout) > 0:
                    sizes.append(int(out.stdout))
            except (OSError, subprocess.SubprocessError):
                pass
    return max(sizes) if sizes else _FALLBACK_CACHE_BYTES


def cpu_chunk_bytes(mode: str = "infer") -> int:
    """The most bytes of radial weights one edge chunk may take on a CPU: ``CPU_CHUNK_BYTES``
    or the last-level cache if smaller, ``CPU_TRAIN_CHUNK_FACTOR`` times that in training."""
    return min(CPU_CHUNK_BYTES, last_level_cache_bytes()) * (CPU_TRAIN_CHUNK_FACTOR if mode == "train" else 1)


@functools.cache
def device_memory_bytes() -> int:
    """Memory of the default device as XLA reports it (16 GB when it does not)."""
    import jax

    try:
        return int(jax.devices()[0].memory_stats()["bytes_limit"])
    except Exception:  # CPUs and some plugins report no memory statistics
        return _FALLBACK_DEVICE_BYTES


def edge_chunk_rows(execution: Execution, num_rows: int, row_weights: int, backend: str | None = None) -> int | None:
    """Rows (bonds if edges are paired, else edges) per chunk, or None for no chunking.

    ``row_weights``: radial weights per row of the whole layer (what a chunk keeps live on a
    CPU, and what a layer stores on a GPU).
    """
    itemsize = get_policy(execution.precision).compute_dtype.itemsize
    shrink = 2 if execution.low_memory else 1
    edges_per_row = 2 if execution.paired_edges else 1
    if execution.edge_chunk:
        rows = execution.edge_chunk // edges_per_row
    elif backend_kind(backend) == "cpu":
        by_weights = _round_rows(cpu_chunk_bytes(execution.mode) / shrink / (row_weights * itemsize))
        rows = _even_rows(num_rows, min(by_weights, CPU_MAX_CHUNK_EDGES // edges_per_row))
    else:
        budget = (
            execution.radial_memory_mb * (1 << 20)
            if execution.radial_memory_mb
            else CHUNK_MEMORY_FRACTION[execution.mode] * device_memory_bytes()
        ) / shrink
        layer_bytes = num_rows * row_weights * itemsize
        if layer_bytes <= budget:
            return None
        rows = _even_rows(num_rows, int(num_rows * budget / layer_bytes))
    rows = max(rows, 1)
    return None if rows >= num_rows else rows


def _even_rows(num_rows: int, max_rows: int) -> int:
    """The fewest chunks of at most ``max_rows`` rows, evenly sized (rounded up to a multiple of
    8 rows, which never adds a chunk): no mostly-empty last chunk of padding."""
    if max_rows >= num_rows:
        return num_rows
    rows = math.ceil(num_rows / math.ceil(num_rows / max(max_rows, 1)))
    return rows + (-rows % 8 if rows >= 8 else 0)


def remat_radial(
    execution: Execution, num_rows: int, row_weights: int, chunked: bool, backend: str | None = None
) -> bool:
    """Whether to recompute the per-edge radial weights in the backward pass (``remat``
    ``auto``: always on a CPU, where chunks keep them in cache, and whenever edges are
    chunked; on a GPU, unless one layer's weights fit ``STORE_MEMORY_FRACTION`` of memory)."""
    if execution.remat != "auto":
        return execution.remat == "on"
    if execution.low_memory or chunked or backend_kind(backend) == "cpu":
        return True
    layer_bytes = num_rows * row_weights * get_policy(execution.precision).compute_dtype.itemsize
    return layer_bytes > STORE_MEMORY_FRACTION * device_memory_bytes()


def _round_rows(rows: float) -> int:
    """Round down to a multiple of 8 (16 and more) or a power of two below that."""
    rows = int(rows)
    if rows >= 16:
        return rows - rows % 8
    return 1 << max(rows.bit_length() - 1, 0)
