"""The execution plan: options validated, ``auto`` resolved per backend and mode, edge chunks
and rematerialisation sized by the rules written next to their measurements, and every
contraction asking for the precision its policy promises (fp32 is float32 on every backend)."""

import jax
import jax.numpy as jnp
import pytest

from se3jax import execution as ex
from se3jax.execution import Execution, FuseLevel
from se3jax.fiber import Fiber
from se3jax.layers.convolution import PathGroup, conv_plan
from se3jax.model import SE3TransformerPooled

HIDDEN = Fiber.create(4, 32)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(precision="fp8"), "unknown precision 'fp8'"),
        (dict(fuse_level="fused"), "'fused' is not a valid FuseLevel"),
        (dict(remat="sometimes"), "unknown remat 'sometimes'"),
        (dict(mode="eval"), "unknown mode 'eval'"),
        (dict(edge_chunk=-1), "edge_chunk >= 0"),
    ],
)
def test_bad_options_are_refused(options, message):
    with pytest.raises(ValueError, match=message):
        Execution(**options)


def test_executions_are_hashable_values():
    assert Execution(fuse_level=FuseLevel.FULL) == Execution(fuse_level="full")
    assert hash(Execution(fuse_level=FuseLevel.FULL)) == hash(Execution(fuse_level="full"))
    assert Execution().for_mode("infer") == Execution(mode="infer")


@pytest.mark.parametrize(
    "backend,mode,expected",
    [
        ("cpu", "train", "none"),
        ("cpu", "infer", "none"),
        ("gpu", "train", "partial_out"),
        ("gpu", "infer", "partial_out"),
        ("cuda", "train", "partial_out"),  # every accelerator follows the GPU table
    ],
)
def test_auto_level_follows_the_measured_table(backend, mode, expected):
    assert ex.resolve_fuse_level("auto", HIDDEN, HIDDEN, backend, mode).value == expected


def test_levels_the_fibers_cannot_do_fall_back_to_the_widest_allowed():
    first = Fiber({0: 6})  # one input degree: nothing to fuse on the input side
    assert ex.resolve_fuse_level("partial_out", first, HIDDEN, "gpu") == FuseLevel.PARTIAL_IN
    ragged_in, ragged_out = Fiber({0: 3, 1: 2}), Fiber({0: 2, 2: 3})
    assert ex.resolve_fuse_level("full", ragged_in, ragged_out, "gpu") == FuseLevel.NONE
    assert ex.resolve_fuse_level("auto", first, Fiber({0: 128}), "gpu", "infer") == FuseLevel.NONE


def test_cpu_chunks_are_even_and_sized_to_the_last_level_cache(monkeypatch):
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 32 << 20)
    plan = conv_plan(HIDDEN, HIDDEN, FuseLevel.NONE, 3)
    group_bytes = plan.max_group_row_weights * 4  # 32 x 32 x 7 floats per bond
    rows = ex.edge_chunk_rows(Execution(), 5000, plan.n_weights, plan.max_group_row_weights, "cpu")
    # at most 1,170 rows fit 32 MB: 5 even chunks of 1,000 rows rather than 4 full and a stub
    assert rows == 1000 and rows * group_bytes <= 32 << 20 and -(-5000 // rows) == 5
    # bf16 halves the bytes per row, low-memory halves the budget
    assert (
        ex.edge_chunk_rows(Execution(precision="bf16"), 5000, plan.n_weights, plan.max_group_row_weights, "cpu") == 1672
    )
    assert (
        ex.edge_chunk_rows(Execution(low_memory=True), 5000, plan.n_weights, plan.max_group_row_weights, "cpu") == 560
    )
    # a batch smaller than one chunk is not chunked
    assert ex.edge_chunk_rows(Execution(), 500, plan.n_weights, plan.max_group_row_weights, "cpu") is None


def test_gpu_chunks_only_above_the_memory_cap(monkeypatch):
    monkeypatch.setattr(ex, "device_memory_bytes", lambda: 80 << 30)  # an H100
    weights = 45_056
    # batch 240 in bf16: 5,024 bonds x 45,056 x 2 B = 0.45 GB per layer: unchunked
    assert ex.edge_chunk_rows(Execution(precision="bf16"), 5_024, weights, 16_384, "gpu") is None
    # an explicit cap of 256 MB: the fewest even chunks that fit, rows a multiple of 8
    rows = ex.edge_chunk_rows(Execution(precision="bf16", radial_memory_mb=256), 5_024, weights, 16_384, "gpu")
    assert rows % 8 == 0 and rows * weights * 2 <= (256 << 20) * 1.01
    assert -(-5_024 // rows) == -(-5_024 * weights * 2 // (256 << 20))
    # batch 1000 in fp32 (3.8 GB per layer) is over 2.5% of 80 GB in training, not in inference
    assert ex.edge_chunk_rows(Execution(), 20_928, weights, 16_384, "gpu") is not None
    assert ex.edge_chunk_rows(Execution(mode="infer"), 20_928, weights, 16_384, "gpu") is None
    # an explicit chunk is in edges: paired edges make it half as many bonds
    assert ex.edge_chunk_rows(Execution(edge_chunk=512), 5_024, weights, 16_384, "gpu") == 256
    assert ex.edge_chunk_rows(Execution(edge_chunk=512, paired_edges=False), 5_024, weights, 16_384, "gpu") == 512


def test_remat_rule(monkeypatch):
    monkeypatch.setattr(ex, "device_memory_bytes", lambda: 80 << 30)
    bf16 = Execution(precision="bf16")
    assert not ex.remat_radial(bf16, 5_024, 45_056, chunked=False, backend="gpu")  # 0.45 GB: stored
    assert ex.remat_radial(bf16, 20_928, 45_056, chunked=False, backend="gpu")  # 1.9 GB: recomputed
    assert ex.remat_radial(bf16, 5_024, 45_056, chunked=True, backend="gpu")
    assert ex.remat_radial(bf16, 5_024, 45_056, chunked=False, backend="cpu")
    assert ex.remat_radial(bf16.replace(low_memory=True), 5_024, 45_056, chunked=False, backend="gpu")
    assert not ex.remat_radial(bf16.replace(remat="off"), 20_928, 45_056, chunked=True, backend="cpu")
    assert ex.remat_radial(bf16.replace(remat="on"), 8, 45_056, chunked=False, backend="gpu")


def test_last_level_cache_is_read_from_the_os():
    size = ex.last_level_cache_bytes()
    assert isinstance(size, int) and size >= 256 << 10


def test_path_groups_compare_as_values():
    a = conv_plan(HIDDEN, HIDDEN, FuseLevel.PARTIAL_OUT, 3).groups
    b = conv_plan(Fiber.create(4, 32), Fiber.create(4, 32), FuseLevel.PARTIAL_OUT, 3).groups
    assert isinstance(a[0], PathGroup) and a[0] == b[0] and a[0] != a[1]
    assert len({a[0], b[0], a[1]}) == 2


def _dot_generals(jaxpr):
    """Every dot_general of a jaxpr, inside checkpoints, loops and custom rules too."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (list, tuple)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _dot_generals(inner)


@pytest.mark.parametrize("precision,expected", [("fp32", "HIGHEST"), ("tf32", "HIGH"), ("bf16", "DEFAULT")])
def test_every_contraction_asks_for_its_policy_precision(precision, expected, small_batch):
    """Forward and backward, chunked: no contraction is left to a backend default (which is
    TensorFloat-32 on NVIDIA GPUs) or to a global flag a user's pipeline may have set."""
    model = SE3TransformerPooled(
        num_layers=1, num_channels=8, num_heads=2, execution=Execution(precision=precision, edge_chunk=32)
    )
    params = model.init(jax.random.PRNGKey(0), small_batch)
    grad = jax.grad(
        lambda p, pos: jnp.sum(model.apply(p, small_batch._replace(nodes={**small_batch.nodes, "positions": pos}))),
        argnums=(0, 1),
    )
    with jax.default_matmul_precision("bfloat16"):  # a hostile global setting changes nothing
        jaxpr = jax.make_jaxpr(grad)(params, small_batch.nodes["positions"]).jaxpr
    dots = list(_dot_generals(jaxpr))
    assert len(dots) > 20
    precisions = {str(eqn.params["precision"]) for eqn in dots}
    assert all(expected in p and (expected != "HIGH" or "HIGHEST" not in p) for p in precisions), precisions
    if precision == "bf16":  # the big contractions really run in bfloat16
        assert any(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in dots)
    else:
        assert all(eqn.invars[0].aval.dtype == jnp.float32 for eqn in dots)
