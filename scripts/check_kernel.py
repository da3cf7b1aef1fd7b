"""Compile the fused radial-contraction kernels for NVIDIA Hopper (sm_90) on any machine, no GPU.

For each fusion group of a hidden layer at real shapes (batch 240: 5,024 bonds, S=2, M=32,
O=32, J=128/320/448/512, K=1/3/5/7), this lowers ``value_and_grad`` of
:func:`se3jax.layers.fused_kernel.fused_messages` for the ``cuda`` platform, takes every
Triton kernel the lowering emitted (the forward, the ``dh``/``dt`` kernel and the weight-gradient
kernel: the Triton IR serialised in each ``__gpu$xla.gpu.triton`` custom call), compiles it for
sm_90 with the ``triton`` package's compiler, assembles the PTX with its bundled ``ptxas -v``
and prints, per kernel: shared memory, registers, spill stores/loads, and the bytes each
kernel moves next to the XLA path's (an estimate from the shapes: every byte a program loads
or stores, so ``W`` re-reads that hit L2 are counted too).

    pip install triton            # only for this script: never a dependency of se3jax
    python scripts/check_kernel.py --out kernel_check.json
    python scripts/check_kernel.py --lower-only        # no triton: the lowering half alone

Exits non-zero when a kernel fails to lower or compile, or is over the limits (shared memory
> 227 KB per block, any spills). Without ``triton`` the compile half is skipped with a message
(and the exit status reflects the lowering alone). Needs JAX 0.10.x: it emits each kernel's
Triton IR in the module. JAX >= 0.11 compiles the IR to PTX while lowering, through a handler
that only its CUDA plugin registers (a CPU-only install fails with "does not have a Triton
compilation handler"), and stores the result compressed in a ``triton_kernel_call_ffi``, which
this script does not read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax._src.lib.mlir import ir  # noqa: E402  (reading the custom call's attributes)

from se3jax.layers.fused_kernel import TILES, Dims, Tiles, fused_messages, weight_grad_parts  # noqa: E402
from se3jax.precision import get_policy  # noqa: E402

SMEM_LIMIT = 227 * 1024  # bytes of shared memory one block may use on sm_90
GROUPS = ((128, 1), (320, 3), (448, 5), (512, 7))  # (J, K) of a hidden layer's partial_out groups
ROWS, S, M, O = 5024, 2, 32, 32  # batch 240: bonds (paired edges), directions, radial width, channels
TRITON_TARGET = "__gpu$xla.gpu.triton"


def lowered_kernels(j: int, k: int, precision: str, rows: int, tiles: Tiles) -> list[dict]:
    """Lower ``value_and_grad`` of the fused messages for ``cuda``; return each Triton kernel:
    name, Triton IR text, launch grid, warps and stages."""
    policy = get_policy(precision)
    args = (
        jax.ShapeDtypeStruct((rows, M), jnp.float32),
        jax.ShapeDtypeStruct((M, O * j), jnp.float32),
        jax.ShapeDtypeStruct((rows, S, j, k), jnp.float32),
    )

    def loss(h, w, t):
        return jnp.sum(fused_messages(h, w, t, policy, tiles) ** 2)

    lowered = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).trace(*args).lower(lowering_platforms=("cuda",))
    module = lowered.compiler_ir("stablehlo")
    calls = []

    def walk(op):
        for region in op.regions:
            for block in region:
                for child in block:
                    if child.name == "stablehlo.custom_call":
                        calls.append(child)
                    walk(child)

    walk(module.operation)
    kernels, others = [], []
    for call in calls:
        target = ir.StringAttr(call.attributes["call_target_name"]).value
        if target != TRITON_TARGET:
            others.append(target)
            continue
        config = ir.DictAttr(call.attributes["mhlo.backend_config"])
        integer = lambda key: ir.IntegerAttr(config[key]).value  # noqa: E731
        with triton_ir_context():
            text = ir.Module.parse(ir.StringAttr(config["ir"]).value_bytes).operation.get_asm()
        kernels.append(
            dict(
                name=ir.StringAttr(config["name"]).value,
                ttir=text,
                grid=(integer("grid_x"), integer("grid_y"), integer("grid_z")),
                num_warps=integer("num_warps"),
                num_stages=integer("num_stages"),
            )
        )
    if not kernels:
        raise RuntimeError(f"no {TRITON_TARGET} calls in the cuda lowering (custom calls: {others})")
    return kernels


def triton_ir_context():
    """An MLIR context that knows the Triton dialect (to read the serialised kernels)."""
    from jax._src.pallas.triton import lowering  # noqa: PLC0415  (private: only this script needs it)

    return lowering._new_ir_context()


def compile_sm90(kernel: dict, workdir: str) -> dict:
    """Compile one kernel's Triton IR for sm_90 with the triton package, then ``ptxas -v``."""
    import triton  # noqa: PLC0415  (optional: only for the compile half)
    from triton.backends.compiler import GPUTarget  # noqa: PLC0415
    from triton.backends.nvidia.compiler import get_ptxas  # noqa: PLC0415

    path = os.path.join(workdir, f"{kernel['name']}.ttir")
    Path(path).write_text(kernel["ttir"])
    compiled = triton.compile(
        path,
        target=GPUTarget("cuda", 90, 32),
        options=dict(num_warps=kernel["num_warps"], num_stages=kernel["num_stages"]),
    )
    ptx = os.path.join(workdir, f"{kernel['name']}.ptx")
    Path(ptx).write_text(compiled.asm["ptx"])
    ptxas = get_ptxas(90).path
    log = subprocess.run(
        [ptxas, "-v", "--regAllocOptLevel=2", "--gpu-name=sm_90a", ptx, "-o", ptx + ".cubin"],
        capture_output=True,
        text=True,
        check=True,
    ).stderr
    return {"dynamic_smem": int(compiled.metadata.shared), **parse_ptxas(log)}


def parse_ptxas(log: str) -> dict:
    """Registers, spills, stack and static shared memory from ``ptxas -v``."""

    def number(pattern, default=0):
        found = re.search(pattern, log)
        return int(found.group(1)) if found else default

    return {
        "registers": number(r"Used (\d+) registers"),
        "spill_stores": number(r"(\d+) bytes spill stores"),
        "spill_loads": number(r"(\d+) bytes spill loads"),
        "stack": number(r"(\d+) bytes stack frame"),
        "static_smem": number(r"(\d+) bytes smem"),
    }


def bytes_moved(j: int, k: int, precision: str, rows: int, tiles: Tiles) -> dict:
    """Device-memory bytes per step of each kernel and of the XLA path (estimates from the
    shapes, megabytes), and every byte the kernels' programs load or store (``loads``:
    re-reads of ``W`` and of ``t`` by the channel blocks of one row tile, which run together,
    hit L2).

    XLA (no remat): the forward writes ``R`` [rows, O*J] in the compute dtype and reads it
    back with ``t``; the backward reads ``R``, ``t`` and ``g``, writes ``dR``, reads it twice
    (``dh``, ``dW``) and writes ``dt``. The kernels read ``t``, ``h``, ``g`` once from device
    memory, write the messages, ``dt``, ``dh`` and a few ``dW`` partials."""
    c = jnp.dtype(get_policy(precision).compute_dtype).itemsize
    f = 4  # float32 messages, cotangents and weight-gradient partials
    d = Dims(rows=rows, m=M, o=O, j=j, k=k, s=S)
    t, h, w = rows * S * j * k * c, rows * M * c, M * O * j * c
    msg = rows * S * O * k * f
    radial = rows * O * j * c
    parts, _ = weight_grad_parts(d, tiles)
    partials = parts * M * O * j * f
    o_blocks, w_blocks = -(-O // tiles.channels), -(-O // tiles.weight_channels)
    hbm = {
        "fused_messages": h + w + t + msg,
        "fused_messages_input_grad": h + w + t + msg + t + h,
        "fused_messages_weight_grad": h + t + msg + partials,
        "xla_forward": h + w + 2 * radial + t + msg,
        "xla_backward": radial + t + msg + 3 * radial + t + 2 * (h + w),
    }
    loads = {
        "fused_messages": (h + t) * o_blocks + w * -(-rows // tiles.rows) + msg,
        "fused_messages_input_grad": 2 * (h + t) + msg + 2 * w * -(-rows // tiles.backward_rows),
        "fused_messages_weight_grad": (h * d.chunks + t) * w_blocks + msg * d.chunks + partials,
    }
    return {name: (hbm[name] / 1e6, loads.get(name, hbm[name]) / 1e6) for name in hbm}


def over_limits(row: dict) -> list[str]:
    problems = []
    smem = row.get("dynamic_smem", 0) + row.get("static_smem", 0)
    if smem > SMEM_LIMIT:
        problems.append(f"shared memory {smem} > {SMEM_LIMIT}")
    if row.get("spill_stores", 0) or row.get("spill_loads", 0):
        problems.append(f"spills {row['spill_stores']}/{row['spill_loads']} B")
    return problems


def main(argv=None) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # fused multiply-adds, as Triton and XLA default to
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", nargs="+", default=["bf16", "fp32"])
    parser.add_argument("--rows", type=int, default=ROWS, help="bonds per step (batch 240: 5,024)")
    parser.add_argument("--groups", nargs="+", default=[f"{j}x{k}" for j, k in GROUPS], help="JxK per group")
    parser.add_argument("--lower-only", action="store_true", help="skip the triton/ptxas compile")
    parser.add_argument("--tiles", default="", help="Tiles overrides, e.g. rows=16,channels=4")
    parser.add_argument("--out", help="write the rows as JSON here")
    args = parser.parse_args(argv)
    tiles = dataclasses.replace(TILES, **{k: int(v) for k, v in (p.split("=") for p in args.tiles.split(",") if p)})
    compile_half = not args.lower_only
    if compile_half:
        try:
            import triton  # noqa: F401, PLC0415
        except ImportError:
            print("triton is not installed: skipping the sm_90 compile (pip install triton; never a se3jax dependency)")
            compile_half = False
    rows, failures = [], 0
    with tempfile.TemporaryDirectory() as workdir:
        for precision in args.precision:
            for group in args.groups:
                j, k = (int(x) for x in group.split("x"))
                start = time.perf_counter()
                try:
                    kernels = lowered_kernels(j, k, precision, args.rows, tiles)
                except Exception as error:  # noqa: BLE001  (reported as a row, the others still run)
                    rows.append(dict(precision=precision, j=j, k=k, kernel="lowering", error=repr(error)[:300]))
                    failures += 1
                    continue
                moved = bytes_moved(j, k, precision, args.rows, tiles)
                for kernel in kernels:
                    row = dict(precision=precision, j=j, k=k, kernel=kernel["name"], grid=kernel["grid"])
                    row["hbm_mb"], row["loads_mb"] = moved.get(kernel["name"], (None, None))
                    if compile_half:
                        try:
                            row.update(compile_sm90(kernel, workdir))
                        except Exception as error:  # noqa: BLE001
                            row["error"] = repr(error)[:300]
                    row["problems"] = over_limits(row) + ([row["error"]] if "error" in row else [])
                    failures += bool(row["problems"])
                    rows.append(row)
                rows.append(
                    dict(
                        precision=precision,
                        j=j,
                        k=k,
                        kernel="xla (forward + backward)",
                        hbm_mb=moved["xla_forward"][0] + moved["xla_backward"][0],
                        problems=[],
                        seconds=round(time.perf_counter() - start, 1),
                    )
                )
    print(format_table(rows, tiles))
    if args.out:
        Path(args.out).write_text(json.dumps(dict(tiles=dataclasses.asdict(tiles), rows=rows), indent=1))
    print(f"{failures} kernel(s) failing" if failures else "all kernels within the sm_90 limits")
    return 1 if failures else 0


def format_table(rows: list[dict], tiles: Tiles) -> str:
    header = "| prec | J | K | kernel | grid | smem B | regs | spill st/ld B | HBM MB | loads MB | problems |"
    lines = [f"tiles: {tiles}", header, "|" + "---|" * 11]
    for r in rows:
        smem = r.get("dynamic_smem", 0) + r.get("static_smem", 0) if "registers" in r else "-"
        spills = f"{r['spill_stores']}/{r['spill_loads']}" if "registers" in r else "-"
        hbm = f"{r['hbm_mb']:.0f}" if r.get("hbm_mb") else "-"
        loads = f"{r['loads_mb']:.0f}" if r.get("loads_mb") else "-"
        problems = "; ".join(r.get("problems", [])) or r.get("error", "")
        lines.append(
            f"| {r['precision']} | {r['j']} | {r['k']} | {r['kernel']} | {r.get('grid', '-')} | {smem} | "
            f"{r.get('registers', '-')} | {spills} | {hbm} | {loads} | {problems} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
