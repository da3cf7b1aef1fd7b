"""Measure the QM9 SE(3)-Transformer: training-step and inference throughput, compile time,
memory, FLOPs, and the rotation invariance of the predictions on the device.

The measuring behind ``scripts/benchmark.py`` (sweeps) and ``scripts/gpu_check.py`` (the
one-call device check). Batches are synthetic QM9-sized molecules
(:func:`se3jax.testing.synthetic_batch`), padded as the QM9 loader pads a batch of that size.
Throughput is the median over timed steps after warm-up; compile time is separate.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import statistics
import time

import jax
import numpy as np
import optax

from se3jax.edges import edge_inputs
from se3jax.execution import Execution, edge_chunk_rows, remat_radial, resolve_fuse_level, resolve_kernel
from se3jax.fiber import Fiber
from se3jax.graphs import HARMONICS, POSITIONS, padding_masks
from se3jax.host_memory import peak_rss_bytes, release_freed_host_memory
from se3jax.initialisation import init_params
from se3jax.layers.convolution import conv_plan
from se3jax.model import SE3TransformerPooled
from se3jax.precision import get_policy
from se3jax.testing import random_rotations, relative_error, synthetic_batch
from se3jax.training.steps import create_train_state, make_train_step


@dataclasses.dataclass(frozen=True)
class Setting:
    """One benchmark row: a workload (mode, batch size, model depth) and how it executes."""

    mode: str = "train"  # train | infer
    batch_size: int = 100
    num_layers: int = 7
    num_channels: int = 32
    num_heads: int = 8
    execution: Execution = Execution()
    loss_scaling: bool | None = None  # None: as the precision needs (fp16)
    precompute_bases: bool = False

    @property
    def label(self) -> str:
        e, default = self.execution, Execution()
        parts = [self.mode, f"b{self.batch_size}", e.precision, e.fuse_level]
        if e.edge_chunk:
            parts.append(f"chunk{e.edge_chunk}")
        if e.radial_memory_mb != default.radial_memory_mb:
            parts.append(f"cap{e.radial_memory_mb}MB")
        if e.remat != default.remat:
            parts.append(f"remat-{e.remat}")
        if e.kernel != default.kernel:
            parts.append(e.kernel)
        for flag, name in (
            (e.low_memory, "lowmem"),
            (not e.paired_edges, "unpaired"),
            (self.precompute_bases, "precomputed"),
        ):
            if flag:
                parts.append(name)
        if self.loss_scaling is False and get_policy(e.precision).needs_loss_scaling:
            parts.append("no-loss-scale")
        return " ".join(parts)


def flop_count(jitted, *args) -> float:
    """XLA's FLOP estimate of ``jitted(*args)``, from its HLO lowered for the CPU (the GPU
    backend's cost analysis is missing or counts differently per precision), NaN if none."""
    # abstract arguments: device arrays would carry their (GPU) placement into a CPU lowering
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), args)
    try:
        cost = jitted.trace(*abstract).lower(lowering_platforms=("cpu",)).cost_analysis()
    except Exception as err:  # a backend without a cost model raises instead of returning nothing
        # said, not swallowed: on an H100 (JAX 0.11.2) this returned NaN for a reason not yet seen
        logging.warning("no FLOP count (%s: %s)", type(err).__name__, str(err)[:300])
        return float("nan")
    cost = cost[0] if isinstance(cost, (list, tuple)) and cost else cost
    return float(cost.get("flops", float("nan"))) if cost else float("nan")


def memory_stats(compiled) -> dict:
    """XLA's memory analysis of a compiled computation: argument + output + temp bytes, less
    the outputs that reuse donated argument buffers (the train state is updated in place)."""
    mem = compiled.memory_analysis()
    out = {}
    if mem is not None:
        out.update(
            argument_bytes=mem.argument_size_in_bytes,
            output_bytes=mem.output_size_in_bytes,
            alias_bytes=mem.alias_size_in_bytes,
            temp_bytes=mem.temp_size_in_bytes,
        )
        out["total_bytes"] = out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temp_bytes"]
    return out


def time_steps(run, warmup: int, steps: int) -> list[float]:
    for _ in range(warmup):
        run()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    return times


def rotated(graphs, rotation: np.ndarray):
    """The same batch with every position rotated (edge inputs follow from positions)."""
    positions = np.asarray(graphs.nodes[POSITIONS], np.float64) @ rotation.T
    return graphs._replace(nodes={**graphs.nodes, POSITIONS: positions.astype(np.float32)})


def resolved_plan(setting: Setting, num_edges: int, backend: str | None = None) -> dict:
    """What ``auto`` resolves to for the hidden layers of this setting: level, edge chunk,
    rematerialisation and contraction kernel."""
    e = setting.execution.for_mode(setting.mode)
    hidden = Fiber.create(4, setting.num_channels)
    level = resolve_fuse_level(e.fuse_level, hidden, hidden, backend, e.mode)
    plan = conv_plan(hidden, hidden, level, 3)
    rows = num_edges // 2 if e.paired_edges else num_edges
    chunk = edge_chunk_rows(e, rows, plan.n_weights, backend)
    recomputed = remat_radial(e, rows, plan.n_weights, chunk is not None, backend)
    return {
        "resolved_level": level.value,
        "resolved_remat": recomputed if e.mode == "train" else None,
        "resolved_kernel": resolve_kernel(e, recomputed, backend),
        "resolved_chunk_edges": None if chunk is None else chunk * (2 if e.paired_edges else 1),
    }


@functools.lru_cache(maxsize=4)
def _initial_params(num_layers: int, num_channels: int, num_heads: int):
    model = SE3TransformerPooled(num_layers=num_layers, num_channels=num_channels, num_heads=num_heads)
    example = synthetic_batch(np.random.default_rng(0), 2)
    return jax.device_get(init_params(model, jax.random.PRNGKey(0), example))


@dataclasses.dataclass
class Prepared:
    """A compiled setting ready to time: ``run()`` executes one step (blocking)."""

    setting: Setting
    result: dict
    run: callable
    compiled: object
    model: SE3TransformerPooled
    host_batch: object
    batch: object
    holder: dict


def prepare(setting: Setting, seed: int = 0, count_flops: bool = True) -> Prepared:
    """Build the synthetic batch, initialise, compile (timed) and analyse one setting."""
    e = setting.execution.for_mode(setting.mode)
    rng = np.random.default_rng(seed)
    host_batch = synthetic_batch(rng, setting.batch_size)
    if setting.precompute_bases:  # as the loader does with config.precompute_bases
        edges = edge_inputs(host_batch.nodes[POSITIONS], host_batch.senders, host_batch.receivers, 3)
        host_batch = host_batch._replace(edges={**host_batch.edges, HARMONICS: np.asarray(edges.harmonics)})
    batch = jax.device_put(host_batch)
    num_molecules = int(np.sum(np.asarray(padding_masks(host_batch).graphs)))
    model = SE3TransformerPooled(
        num_layers=setting.num_layers, num_channels=setting.num_channels, num_heads=setting.num_heads, execution=e
    )
    loss_scaling = get_policy(e.precision).needs_loss_scaling if setting.loss_scaling is None else setting.loss_scaling
    result = {
        "label": setting.label,
        "mode": setting.mode,
        "batch_size": setting.batch_size,
        "num_layers": setting.num_layers,
        **dataclasses.asdict(e),
        "loss_scaling": loss_scaling,
        "precompute_bases": setting.precompute_bases,
        "molecules": num_molecules,
        "num_nodes": int(host_batch.nodes[POSITIONS].shape[0]),
        "num_edges": int(host_batch.senders.shape[0]),
        "backend": jax.default_backend(),
        **resolved_plan(setting, int(host_batch.senders.shape[0])),
    }
    # parameters do not depend on the execution or the batch: initialise once per model size
    params = jax.device_put(_initial_params(setting.num_layers, setting.num_channels, setting.num_heads))
    if setting.mode == "train":
        optimizer = optax.adamw(2e-3, weight_decay=0.1)
        state = create_train_state(
            model, optimizer, batch, jax.random.PRNGKey(0), loss_scaling=loss_scaling, params=params
        )
        holder = {"state": state}

        def jitted(m):
            return jax.jit(make_train_step(m), donate_argnums=0)

        args = (state, batch)
    else:  # inference needs no optimizer state: only the parameters are kept on the device
        holder = {"params": params}

        def jitted(m):
            return jax.jit(m.apply)

        args = (params, batch)
    start = time.perf_counter()
    compiled = jitted(model).lower(*args).compile()
    result["compile_s"] = time.perf_counter() - start
    result.update(memory_stats(compiled))
    if count_flops:
        # XLA counts a loop body once, so count FLOPs on the same step with edges unchunked
        result["flops"] = flop_count(jitted(model.clone(execution=e.replace(edge_chunk=1 << 30))), *args)
    del args
    release_freed_host_memory()  # after the FLOP count's lowering too: the steps start clean

    def run():
        if setting.mode == "train":
            holder["state"], metrics = compiled(holder["state"], batch)
            jax.block_until_ready(metrics)
        else:
            jax.block_until_ready(compiled(holder["params"], batch))

    return Prepared(setting, result, run, compiled, model, host_batch, batch, holder)


def summarise_times(result: dict, times: list[float]) -> dict:
    median = statistics.median(times)
    result.update(
        step_s=median, step_s_min=min(times), step_s_max=max(times), molecules_per_s=result["molecules"] / median
    )
    if np.isfinite(result.get("flops", np.nan)):
        result["tflops_per_s"] = result["flops"] / median / 1e12
    return result


def measure(
    setting: Setting,
    steps: int = 10,
    warmup: int = 2,
    rotations: int = 0,
    seed: int = 0,
    count_flops: bool = True,
    profile_dir: str | None = None,
) -> dict:
    """Compile and time one setting. ``rotations > 0``: also the invariance error of the
    predictions (max relative error over that many random rotations of the whole batch).
    ``profile_dir``: also trace a few steps there and split their time by op class
    (:mod:`se3jax.profiling`)."""
    p = prepare(setting, seed, count_flops)
    result = summarise_times(p.result, time_steps(p.run, warmup, steps))
    result["peak_rss_bytes"] = peak_rss_bytes()
    if profile_dir:
        from se3jax.profiling import profile_compiled

        result["profile"] = profile_compiled(p.run, p.compiled.as_text(), profile_dir)
    if rotations:
        e = setting.execution.for_mode(setting.mode)
        params = p.holder["state"].params if setting.mode == "train" else p.holder["params"]
        apply = p.compiled if setting.mode == "infer" else jax.jit(p.model.clone(execution=e.for_mode("infer")).apply)
        real = np.asarray(padding_masks(p.host_batch).graphs)
        reference = np.asarray(apply(params, p.batch))[real]
        errors = [
            relative_error(np.asarray(apply(params, jax.device_put(rotated(p.host_batch, r))))[real], reference)
            for r in random_rotations(np.random.default_rng(seed + 1), rotations)
        ]
        result["invariance_error"] = max(errors)
    return result


def interleaved(
    settings: list[Setting], rounds: int = 3, steps: int = 2, warmup: int = 1, count_flops: bool = False
) -> list[dict]:
    """Compile every setting, then time them round-robin (A B C A B C ...): each setting gets
    ``rounds x steps`` timed steps spread over the whole sitting, so a burst of load from other
    processes slows all settings alike instead of one. Medians per setting."""
    prepared = [prepare(s, count_flops=count_flops) for s in settings]
    for p in prepared:
        for _ in range(warmup):
            p.run()
    times = [[] for _ in prepared]
    for _ in range(rounds):
        for p, t in zip(prepared, times):
            t.extend(time_steps(p.run, 0, steps))
    return [summarise_times(p.result, t) for p, t in zip(prepared, times)]


def format_row(r: dict) -> str:
    mem = r.get("total_bytes", float("nan")) / 1e9
    temp = r.get("temp_bytes", float("nan")) / 1e6
    rss = r.get("peak_rss_bytes", float("nan")) / 1e9
    inv = r.get("invariance_error")
    return (
        f"| {r['label']} | {r.get('resolved_level', '')} | {r.get('resolved_chunk_edges') or 'none'} | "
        f"{r['molecules_per_s']:,.1f} | {r['step_s'] * 1e3:.1f} | {r['compile_s']:.1f} | {mem:.2f} | {temp:,.0f} | "
        f"{rss:.2f} | {r.get('tflops_per_s', float('nan')):.2f} | {'' if inv is None else f'{inv:.1e}'} |"
    )


# peak RSS: the whole process's so far (compiles included); one setting per process to read it per setting
TABLE_HEADER = (
    "| setting | level | edge chunk | molecules/s | step (ms) | compile (s) | XLA memory (GB) | XLA temp (MB) "
    "| peak RSS (GB) | TFLOP/s | invariance error |\n|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
)
