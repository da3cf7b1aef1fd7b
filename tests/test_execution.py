"""The execution plan: options validated, ``auto`` resolved per backend and mode, edge chunks
and rematerialisation sized by the rules written next to their measurements, and every
contraction asking for the precision its policy promises (fp32 is float32 on every backend)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from se3jax import execution as ex
from se3jax.basis import HARMONICS_SCOPE
from se3jax.edges import EdgeInputs
from se3jax.execution import Execution, FuseLevel
from se3jax.fiber import Fiber
from se3jax.initialisation import init_params
from se3jax.layers.attention import AttentionBlockSE3
from se3jax.layers.convolution import ConvSE3, PathGroup, basis_contraction, conv_plan, group_basis, group_weights
from se3jax.layers.norm import NORM_SCOPE, NormSE3
from se3jax.model import SE3TransformerPooled
from se3jax.precision import get_policy
from se3jax.testing import relative_error, synthetic_batch

HIDDEN = Fiber.create(4, 32)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(precision="fp8"), "unknown precision 'fp8'"),
        (dict(fuse_level="fused"), "'fused'"),
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


def test_cpu_chunks_are_even_and_sized_to_the_cache_budget(monkeypatch):
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 32 << 20)
    plan = conv_plan(HIDDEN, HIDDEN, FuseLevel.NONE, 3)
    budget = ex.cpu_chunk_bytes("infer")
    assert budget == 32 << 20 and ex.cpu_chunk_bytes("train") == ex.CPU_TRAIN_CHUNK_FACTOR * budget
    row_bytes = plan.n_weights * 4  # every path's radial weights of one bond, float32

    def rows(num_rows=5000, **options):
        execution = Execution(**{"mode": "infer", **options})
        return ex.edge_chunk_rows(execution, num_rows, plan.n_weights, "cpu")

    fp32 = rows()
    chunks = -(-5000 // fp32)
    # the fewest chunks whose radial weights fit the budget, evenly sized (a multiple of 8 rows)
    assert fp32 * row_bytes <= budget and fp32 % 8 == 0
    assert -(-5000 // (chunks - 1)) > budget // row_bytes // 8 * 8  # one chunk fewer would not fit
    assert chunks * fp32 - 5000 < 8 * chunks  # no mostly-padding last chunk
    # bf16 halves the bytes per row: about twice the rows; low-memory halves the budget
    assert rows(precision="bf16") * row_bytes // 2 <= budget < rows(precision="bf16") * row_bytes
    assert rows(low_memory=True) * row_bytes <= budget // 2 < fp32 * row_bytes
    # training: chunks fitting CPU_TRAIN_CHUNK_FACTOR times the budget (measured faster)
    train = rows(mode="train")
    assert train * row_bytes <= ex.cpu_chunk_bytes("train") and train > 2 * fp32
    # a batch that fits one chunk is not chunked
    assert rows(num_rows=fp32 // 2) is None


def test_cpu_chunks_have_at_most_the_edge_cap_whatever_the_weights(monkeypatch):
    # a layer with few radial weights per edge (a trunk's output layer) on a graph of 10^5
    # edges: the weight budget alone would leave it unchunked or in chunks of tens of
    # thousands of edges, whose gathered features, bases and messages are what then dominates
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 32 << 20)
    last = conv_plan(HIDDEN, Fiber({1: 1, 2: 1}), FuseLevel.NONE, 3)
    cap = ex.CPU_MAX_CHUNK_EDGES
    for mode in ("train", "infer"):
        for paired in (True, False):
            execution, per_row = Execution(mode=mode, paired_edges=paired), 2 if paired else 1
            num_rows = 120_000 // per_row
            rows = ex.edge_chunk_rows(execution, num_rows, last.n_weights, "cpu")
            assert rows is not None and rows * per_row <= cap
            assert -(-num_rows // rows) == -(-num_rows * per_row // cap)  # the fewest chunks under the cap
            by_weights = ex.cpu_chunk_bytes(mode) // (last.n_weights * 4)
            assert by_weights * per_row > cap  # the cap, not the weights, decided


def test_cpu_chunk_budget_follows_the_cache_up_to_the_measured_size(monkeypatch):
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 4 << 20)
    assert ex.cpu_chunk_bytes("infer") == 4 << 20  # a small cache: the chunk fits it
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 256 << 20)
    assert ex.cpu_chunk_bytes("infer") == ex.CPU_CHUNK_BYTES  # a big server L3 is shared: not extrapolated


def test_gpu_chunks_only_above_the_memory_cap(monkeypatch):
    monkeypatch.setattr(ex, "device_memory_bytes", lambda: 80 << 30)  # an H100
    weights = 45_056
    # batch 240 in bf16: 5,024 bonds x 45,056 x 2 B = 0.45 GB per layer: unchunked
    assert ex.edge_chunk_rows(Execution(precision="bf16"), 5_024, weights, "gpu") is None
    # an explicit cap of 256 MB: the fewest even chunks that fit, rows a multiple of 8
    rows = ex.edge_chunk_rows(Execution(precision="bf16", radial_memory_mb=256), 5_024, weights, "gpu")
    assert rows % 8 == 0 and rows * weights * 2 <= (256 << 20) * 1.01
    assert -(-5_024 // rows) == -(-5_024 * weights * 2 // (256 << 20))
    # batch 1000 in fp32 (3.8 GB per layer) is over 2.5% of 80 GB in training, not in inference
    assert ex.edge_chunk_rows(Execution(), 20_928, weights, "gpu") is not None
    assert ex.edge_chunk_rows(Execution(mode="infer"), 20_928, weights, "gpu") is None
    # an explicit chunk is in edges: paired edges make it half as many bonds
    assert ex.edge_chunk_rows(Execution(edge_chunk=512), 5_024, weights, "gpu") == 256
    assert ex.edge_chunk_rows(Execution(edge_chunk=512, paired_edges=False), 5_024, weights, "gpu") == 512


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


def test_kernel_rule():
    # a CPU contracts the radial weights channels-last where no stored weights are needed
    # (inference, or recomputed for the backward pass: always by default on a CPU)
    assert ex.resolve_kernel(Execution(mode="infer"), recomputed=False, backend="cpu") == "xla_channels_last"
    assert ex.resolve_kernel(Execution(), recomputed=True, backend="cpu") == "xla_channels_last"
    assert ex.resolve_kernel(Execution(), recomputed=False, backend="cpu") == "xla"
    for mode in ("train", "infer"):  # GPUs: not measured yet
        assert ex.resolve_kernel(Execution(mode=mode), recomputed=True, backend="gpu") == "xla"
    for kernel in ("xla", "xla_channels_last", "pallas"):  # a forced choice is kept
        assert ex.resolve_kernel(Execution(kernel=kernel), recomputed=False, backend="cpu") == kernel


def test_last_level_cache_is_read_from_sysfs(tmp_path):
    for index, size in (("index0", "48K"), ("index2", "1024K"), ("index3", "32768K"), ("index9", "junk")):
        (tmp_path / index).mkdir()
        (tmp_path / index / "size").write_text(size + "\n")
    (tmp_path / "uevent").write_text("")  # not a cache entry
    assert ex.last_level_cache_bytes(str(tmp_path)) == 32 << 20
    empty = tmp_path / "none"
    empty.mkdir()
    assert ex.last_level_cache_bytes(str(empty)) == ex._FALLBACK_CACHE_BYTES


def test_path_groups_compare_as_values():
    a = conv_plan(HIDDEN, HIDDEN, FuseLevel.PARTIAL_OUT, 3).groups
    b = conv_plan(Fiber.create(4, 32), Fiber.create(4, 32), FuseLevel.PARTIAL_OUT, 3).groups
    assert isinstance(a[0], PathGroup) and a[0] == b[0] and a[0] != a[1]
    assert len({a[0], b[0], a[1]}) == 2


@pytest.mark.parametrize("level", [FuseLevel.NONE, FuseLevel.PARTIAL_OUT, FuseLevel.FULL])
def test_group_weights_are_the_groups_kernel_columns_sliced_where_contiguous(level):
    # a single path's columns are one range: sliced (gradient: a pad), never gathered (a
    # scatter-add in the backward pass, 5% of a CPU training step); fused groups gather
    plan = conv_plan(HIDDEN, HIDDEN, level, 3)
    kernel = jnp.asarray(np.random.default_rng(0).normal(size=(4, plan.n_weights)), jnp.float32)
    for group in plan.groups:
        np.testing.assert_array_equal(group_weights(kernel, group), kernel[:, group.weight_index])
        jaxpr = jax.make_jaxpr(lambda k: group_weights(k, group))(kernel).jaxpr
        primitives = {e.primitive.name for e in _equations(jaxpr)}
        assert ("gather" in primitives) == (level != FuseLevel.NONE), primitives


@pytest.mark.parametrize("level", [FuseLevel.NONE, FuseLevel.PARTIAL_OUT, FuseLevel.FULL])
def test_group_basis_is_the_groups_path_basis_columns_sliced_where_contiguous(level):
    # a single path's basis is one column range: sliced, never gathered (the gather's
    # transposed copies and selects cost 2-5% of a CPU inference step); fused groups gather,
    # with zeros where a group's block has no path
    plan = conv_plan(HIDDEN, HIDDEN, level, 3)
    bases = jnp.asarray(np.random.default_rng(0).normal(size=(6, 1092)), jnp.float32)
    padded = np.concatenate([np.asarray(bases), np.zeros((6, 1))], axis=1)
    for group in plan.groups:
        expected = padded[:, group.basis_index].reshape(6, group.in_dim, group.n_freq, group.out_dim)
        np.testing.assert_array_equal(group_basis(bases, group), expected)
        jaxpr = jax.make_jaxpr(lambda b: group_basis(b, group))(bases).jaxpr
        primitives = {e.primitive.name for e in _equations(jaxpr)}
        assert ("gather" in primitives) == (level != FuseLevel.NONE), primitives


def _sub_jaxprs(eqn):
    """The jaxprs an equation runs (checkpoint, loop and cond bodies, nested jits, custom rules)."""
    for value in eqn.params.values():
        for sub in value if isinstance(value, (list, tuple)) else (value,):
            inner = getattr(sub, "jaxpr", sub)
            if hasattr(inner, "eqns"):
                yield inner


def _equations(jaxpr):
    """Every equation of a jaxpr, inside checkpoints, loops, nested jits and custom rules too."""
    for eqn in jaxpr.eqns:
        yield eqn
        for inner in _sub_jaxprs(eqn):
            yield from _equations(inner)


def _dot_generals(jaxpr):
    """Every dot_general of a jaxpr, inside checkpoints, loops and custom rules too."""
    return (eqn for eqn in _equations(jaxpr) if eqn.primitive.name == "dot_general")


@pytest.mark.parametrize("precision,expected", [("fp32", "HIGHEST"), ("tf32", "HIGH"), ("bf16", "DEFAULT")])
def test_every_contraction_asks_for_its_policy_precision(precision, expected, small_batch):
    """Forward and backward, chunked: no contraction is left to a backend default (which is
    TensorFloat-32 on NVIDIA GPUs) or to a global flag a user's pipeline may have set."""
    model = SE3TransformerPooled(
        num_layers=1, num_channels=8, num_heads=2, execution=Execution(precision=precision, edge_chunk=32)
    )
    params = jax.eval_shape(model.init, jax.random.PRNGKey(0), small_batch)  # a jaxpr needs only shapes
    grad = jax.grad(
        lambda p, pos: jnp.sum(model.apply(p, small_batch._replace(nodes={**small_batch.nodes, "positions": pos}))),
        argnums=(0, 1),
    )
    with jax.default_matmul_precision("bfloat16"):  # a hostile global setting changes nothing
        jaxpr = jax.make_jaxpr(grad)(params, small_batch.nodes["positions"]).jaxpr
    dots = list(_dot_generals(jaxpr))
    # the harmonics (geometry) and NormSE3's norms are full float32 under every policy
    scopes = (HARMONICS_SCOPE, NORM_SCOPE)
    scope_of = lambda eqn: next((s for s in scopes if s in str(eqn.source_info.name_stack)), None)
    exact = [eqn for eqn in dots if scope_of(eqn)]
    dots = [eqn for eqn in dots if not scope_of(eqn)]
    assert len(dots) > 20 and {scope_of(eqn) for eqn in exact} == set(scopes)
    assert all(str(eqn.params["precision"]).count("HIGHEST") == 2 for eqn in exact)
    assert all(eqn.invars[0].aval.dtype == jnp.float32 for eqn in exact)
    precisions = {str(eqn.params["precision"]) for eqn in dots}
    assert all(expected in p and (expected != "HIGH" or "HIGHEST" not in p) for p in precisions), precisions
    if precision == "bf16":  # the big contractions really run in bfloat16
        assert any(eqn.invars[0].aval.dtype == jnp.bfloat16 for eqn in dots)
    else:
        assert all(eqn.invars[0].aval.dtype == jnp.float32 for eqn in dots)


def test_cpu_plan_computes_the_unchunked_function(monkeypatch, small_batch):
    """The chunk ``auto`` picks on a CPU (here made small enough to split the batch in several
    chunks) gives the unchunked model's outputs and gradients: a plan choice, never a different
    function."""
    monkeypatch.setattr(ex, "CPU_CHUNK_BYTES", 16 << 10)
    model = SE3TransformerPooled(
        num_layers=1, num_degrees=2, num_channels=8, num_heads=2, execution=Execution(mode="infer")
    )
    plan = conv_plan(Fiber.create(2, 8), Fiber.create(2, 8), FuseLevel.NONE, 1)
    rows = small_batch.senders.shape[0] // 2
    for mode in ("infer", "train"):  # the plan really chunks this batch in both modes
        chunk = ex.edge_chunk_rows(model.execution.for_mode(mode), rows, plan.n_weights, "cpu")
        assert chunk is not None and -(-rows // chunk) >= 2, mode
    params = init_params(model, jax.random.PRNGKey(0), small_batch)
    unchunked = model.clone(execution=model.execution.replace(edge_chunk=1 << 30))
    outputs = [jax.jit(m.apply)(params, small_batch) for m in (model, unchunked)]
    assert jnp.allclose(*outputs, rtol=1e-5, atol=1e-6)
    train, train_unchunked = (m.clone(execution=m.execution.for_mode("train")) for m in (model, unchunked))
    grads, grads_unchunked = (
        jax.jit(jax.grad(lambda p, m=m: jnp.sum(m.apply(p, small_batch) ** 2)))(params)
        for m in (train, train_unchunked)
    )
    for g, h in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_unchunked)):
        assert jnp.allclose(g, h, rtol=1e-4, atol=1e-6)


# XLA temporaries of one hidden attention block of the QM9 model (4 degrees x 32 channels, 8 heads)
# in inference at the padded shapes of a 100-molecule batch (2,048 nodes, 4,160 edges), with the
# CPU plan for a 32 MB last-level cache. Measured (JAX 0.10.2): 59 MiB with the plan's 352-edge
# chunks (32 MiB with 128-edge chunks); the rule before (2,080-edge chunks) needs 262 MiB,
# unchunked 473 MiB. One block is the honest unit: the whole model reuses its buffers layer after
# layer (136-375 MB of temporaries at batch 100) and takes a minute to compile.
BLOCK_TEMP_BUDGET_MB = 80


def _abstract_block_inputs(nodes: int, edges: int, channels: int):
    """Shapes only: features of degrees 0-3 with ``channels`` each, and QM9-model edge inputs."""
    f32 = jnp.float32
    features = {d: jax.ShapeDtypeStruct((nodes, channels, 2 * d + 1), f32) for d in range(4)}
    edge_inputs = EdgeInputs(
        senders=jax.ShapeDtypeStruct((edges,), jnp.int32),
        receivers=jax.ShapeDtypeStruct((edges,), jnp.int32),
        mask=jax.ShapeDtypeStruct((edges,), jnp.bool_),
        scalars=jax.ShapeDtypeStruct((edges, 5), f32),
        harmonics=jax.ShapeDtypeStruct((edges, 49), f32),
    )
    return features, edge_inputs


def _hidden_block_temp_bytes(execution: Execution) -> int:
    """Compile only (no run): abstract parameters and inputs at batch-100 shapes."""
    graphs = synthetic_batch(np.random.default_rng(0), 100)
    features, edge_inputs = _abstract_block_inputs(graphs.nodes["positions"].shape[0], graphs.senders.shape[0], 32)
    block = AttentionBlockSE3(HIDDEN, HIDDEN, num_heads=8, channels_div=2, execution=execution)
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), features, edge_inputs)
    compiled = jax.jit(block.apply).lower(params, features, edge_inputs).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_inference_memory_of_a_hidden_block_stays_in_budget(monkeypatch):
    monkeypatch.setattr(ex, "last_level_cache_bytes", lambda: 32 << 20)  # this project's CPU
    temp = _hidden_block_temp_bytes(Execution(mode="infer"))
    assert temp <= BLOCK_TEMP_BUDGET_MB << 20, f"{temp / 2**20:.0f} MB of XLA temporaries"


def test_attention_weights_and_sums_all_degrees_values_at_once():
    # One product and one segment sum for the values of every degree (per degree, the weights'
    # gradient summed 1-7 numbers per head, a slow op on a CPU: the trunk's step 4% slower).
    # The block's only segment sums: the softmax's denominator and the values.
    fiber = Fiber.create(4, 16)
    features, edge_inputs = _abstract_block_inputs(10, 24, 16)
    block = AttentionBlockSE3(fiber, fiber, num_heads=4, channels_div=2, execution=Execution(paired_edges=False))
    params = jax.eval_shape(block.init, jax.random.PRNGKey(0), features, edge_inputs)
    jaxpr = jax.make_jaxpr(block.apply)(params, features, edge_inputs).jaxpr
    sums = [e for e in _equations(jaxpr) if e.primitive.name == "scatter-add"]
    assert len(sums) == 2, [e.outvars[0].aval.shape for e in sums]


def test_training_keeps_no_per_edge_radial_activations_outside_the_chunks():
    # The radial network's hidden layers run inside each edge chunk and are recomputed with it
    # in the backward pass: what a chunked convolution keeps for its gradient holds nothing of
    # the network's width per row (run once for all edges before the chunks, its activations,
    # normalisations and masks were a third of the trunk's training peak at 10^5 edges).
    rng = np.random.default_rng(0)
    num_nodes, bonds, channels = 60, 400, 4
    senders = rng.integers(0, num_nodes, bonds)
    receivers = (senders + 1 + rng.integers(0, num_nodes - 1, bonds)) % num_nodes

    def pairs(a, b):  # bond k: edges 2k (a -> b) and 2k + 1 (b -> a)
        return jnp.asarray(np.stack([a, b], 1).reshape(-1), jnp.int32)

    edges = EdgeInputs(
        senders=pairs(senders, receivers),
        receivers=pairs(receivers, senders),
        mask=jnp.ones(2 * bonds, bool),
        scalars=jnp.repeat(jnp.asarray(rng.uniform(1, 3, (bonds, 1)), jnp.float32), 2, axis=0),
        harmonics=jnp.asarray(rng.normal(size=(2 * bonds, 25)), jnp.float32),  # degrees 0-4: max_degree 2
    )
    fiber = Fiber.create(3, channels)
    features = {d: jnp.asarray(rng.normal(size=(num_nodes, channels, 2 * d + 1)), jnp.float32) for d in range(3)}
    conv = ConvSE3(fiber, fiber, execution=Execution(edge_chunk=160))  # 80 bonds a chunk, 5 chunks
    params = init_params(conv, jax.random.PRNGKey(0), features, edges)
    width = params["params"]["radial"]["dense_1"]["kernel"].shape[1]
    assert width not in (channels, 2 * bonds, 25) and not any(2 * d + 1 == width for d in range(3))
    # compiled: the residuals are the jitted forward's outputs (op by op, every primitive compiles)
    _, backward = jax.vjp(jax.jit(lambda p, x: conv.apply(p, x, edges)), params, features)
    kept = [leaf.shape for leaf in jax.tree.leaves(backward) if hasattr(leaf, "shape")]
    per_row = [s for s in kept if len(s) >= 2 and s[-1] == width and np.prod(s) >= bonds * width]
    assert kept and not per_row, f"per-row radial activations kept for the backward pass: {per_row}"


def _loop_body_equations(jaxpr) -> list:
    """The equations that run inside a scan or while loop of ``jaxpr``."""
    loops = (eqn for eqn in _equations(jaxpr) if eqn.primitive.name in ("scan", "while"))
    return [eqn for loop in loops for body in _sub_jaxprs(loop) for eqn in _equations(body)]


def test_the_radial_kernel_is_split_into_groups_not_sliced():
    # Sliced per group, the kernel's gradient is a sum of padded blocks in every edge chunk
    # (0.36 of a training step's 8.9 CPU-busy seconds at batch 100); split, it is one
    # concatenation. The same gradient as without chunks.
    rng = np.random.default_rng(0)
    fiber, num_nodes, num_edges = Fiber.create(3, 4), 12, 64
    edges = EdgeInputs(
        senders=jnp.asarray(rng.integers(0, num_nodes, num_edges), jnp.int32),
        receivers=jnp.asarray(rng.integers(0, num_nodes, num_edges), jnp.int32),
        mask=jnp.ones(num_edges, bool),
        scalars=jnp.asarray(rng.uniform(1, 3, (num_edges, 1)), jnp.float32),
        harmonics=jnp.asarray(rng.normal(size=(num_edges, 25)), jnp.float32),
    )
    features = {d: jnp.asarray(rng.normal(size=(num_nodes, 4, 2 * d + 1)), jnp.float32) for d in range(3)}

    def kernel_grad(chunk):
        execution = Execution(fuse_level=FuseLevel.NONE, paired_edges=False, edge_chunk=chunk)
        conv = ConvSE3(fiber, fiber, execution=execution)
        params = init_params(conv, jax.random.PRNGKey(0), features, edges)
        loss = lambda p: jnp.sum(jnp.stack([jnp.sum(x**2) for x in conv.apply(p, features, edges).values()]))  # noqa: E731
        return jax.jit(jax.grad(loss)), params  # op by op, every primitive compiles on its own

    grad, params = kernel_grad(16)  # 4 chunks
    in_loop = _loop_body_equations(jax.make_jaxpr(grad)(params).jaxpr)
    assert "dot_general" in {eqn.primitive.name for eqn in in_loop}  # the messages do run in the loop
    kernel_shape = params["params"]["radial"]["kernel_out"].shape
    on_kernel = {  # the kernel's own slices, and their gradients (pads to its shape)
        eqn.primitive.name
        for eqn in in_loop
        if kernel_shape in ({v.aval.shape for v in eqn.invars if hasattr(v, "aval")} | {eqn.outvars[0].aval.shape})
    }
    assert "split" in on_kernel and not on_kernel & {"pad", "slice"}, on_kernel
    unchunked_grad, _ = kernel_grad(0)
    chunked = grad(params)["params"]["radial"]["kernel_out"]
    expected = unchunked_grad(params)["params"]["radial"]["kernel_out"]
    # float32 sums of the same terms in another order: errors relative to the largest entry
    np.testing.assert_allclose(chunked, expected, rtol=1e-5, atol=1e-5 * float(jnp.max(jnp.abs(expected))))


def test_norm_sums_components_with_dots_not_reductions():
    # NormSE3's sums over a degree's 2d+1 components are einsums: written as broadcasts and
    # sums, their backward pass became reductions that XLA's CPU compiler ran 2x slower (the
    # trunk's training step 0.91-0.95 with the einsums). The layer norm's own sums stay.
    fiber = Fiber.create(3, 4)
    features = {d: jnp.ones((5, 4, 2 * d + 1)) for d in range(3)}
    norm = NormSE3(fiber)
    params = init_params(norm, jax.random.PRNGKey(0), features)
    # forward and backward pass (the output's cotangent given, so no loss adds its own sums)
    jaxpr = jax.make_jaxpr(lambda p, x: jax.vjp(norm.apply, p, x)[1](x))(params, features).jaxpr
    over_components = [e for e in _equations(jaxpr) if e.primitive.name == "reduce_sum" and e.invars[0].aval.ndim == 3]
    assert not over_components, [e.invars[0].aval.shape for e in over_components]
    assert any(e.primitive.name == "dot_general" for e in _equations(jaxpr))


@pytest.mark.parametrize("precision,tolerance", [("fp32", 1e-6), ("bf16", 1e-2)])
def test_basis_contraction_is_the_einsum_with_its_derivatives(precision, tolerance):
    # its derivative in x runs as broadcast products (no batched dot of tiny matrices in the
    # backward pass): the same values, gradients in both arguments, forward-mode derivatives and
    # a gradient of a gradient as the einsum's. fp32 only sums in another order; bf16 rounds the
    # cotangent to bfloat16 where the dot kept float32 (2^-8 relative).
    policy = get_policy(precision)
    rng = np.random.default_rng(0)
    x, basis = (jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((7, 4, 5), (7, 5, 3, 3)))
    mine = lambda x, b: basis_contraction(x, b, policy)
    ref = lambda x, b: policy.einsum("eil,elfk->eifk", x, b, wide_result=False)
    loss = lambda f: lambda x, b: jnp.sum(jnp.sin(f(x, b).astype(jnp.float32)))
    twice = lambda f: lambda x, b: jnp.sum(jax.grad(loss(f), argnums=1)(x, b) ** 2)  # forces trained on
    pairs = [
        (mine(x, basis), ref(x, basis)),
        (jax.grad(loss(mine), argnums=(0, 1))(x, basis), jax.grad(loss(ref), argnums=(0, 1))(x, basis)),
        (jax.jvp(mine, (x, basis), (x, basis))[1], jax.jvp(ref, (x, basis), (x, basis))[1]),
        (jax.grad(twice(mine))(x, basis), jax.grad(twice(ref))(x, basis)),
    ]
    for got, want in pairs:
        for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
            assert relative_error(g, w) < tolerance
    backward = lambda f: jax.make_jaxpr(lambda x, g: jax.vjp(lambda x: f(x, basis), x)[1](g))
    dots = lambda f: sum(1 for _ in _dot_generals(backward(f)(x, ref(x, basis)).jaxpr))
    assert dots(ref) == 2 and dots(mine) == 1  # the forward's only
