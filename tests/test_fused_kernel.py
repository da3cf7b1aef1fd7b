"""The Pallas kernels that fuse the radial weights into the TFN contraction: they lower to Triton
GPU kernels when the model is lowered for ``cuda`` (on this CPU host, no GPU needed), and run in
interpret mode elsewhere, where they compute the same messages and gradients as the einsum path
in every precision, and a convolution running them is equivariant."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from se3jax.edges import edge_inputs
from se3jax.execution import Execution
from se3jax.fiber import Fiber
from se3jax.graphs import FEATURES, POSITIONS, padding_masks
from se3jax.initialisation import init_params
from se3jax.layers import ConvSE3
from se3jax.layers.fused_kernel import Tiles, fused_messages, reference_messages
from se3jax.model import SE3TransformerPooled
from se3jax.precision import get_policy
from se3jax.testing import assert_equivariant, relative_error, synthetic_batch
from se3jax.training.steps import create_train_state, make_train_step

# Both paths round R = h @ W to the compute dtype and accumulate in float32; they differ in the
# order of the sums, and in the backward pass XLA rounds dR and the dot results for dh and dW
# to the compute dtype where the kernel keeps float32: bf16 keeps 8 mantissa bits (2^-8 = 4e-3
# per rounding), fp16 11 (5e-4); fp32 and tf32 (plain float32 on a CPU) only differ in order.
TOLERANCE = {"fp32": 1e-5, "tf32": 1e-5, "bf16": 3e-2, "fp16": 4e-3}
GPU_KERNEL = "__gpu$xla.gpu.triton"  # JAX 0.10 emits Triton IR here; later versions compiled PTX:
GPU_KERNEL_COMPILED = "triton_kernel_call"
# small tiles so that a few dozen rows already give ragged tiles, several channel blocks and
# several weight-gradient parts
SMALL_TILES = Tiles(rows=16, channels=4, backward_rows=16, weight_rows=16, weight_channels=2)


def inputs(rows, s, seed=0, m=32, o=6, j=20, k=5):
    """Ragged everywhere: J = 20 is one chunk of 16 and a tail, K = 5 and O = 6 are not
    multiples of the on-chip blocks (8, 4)."""
    rng = np.random.default_rng(seed)
    return (
        jnp.asarray(rng.normal(size=(rows, m)), jnp.float32),
        jnp.asarray(rng.normal(size=(m, o * j)) / np.sqrt(m), jnp.float32),
        jnp.asarray(rng.normal(size=(rows, s, j, k)), jnp.float32),
    )


def gpu_kernel_calls(text: str) -> int:
    return text.count(GPU_KERNEL) + text.count(GPU_KERNEL_COMPILED)


@pytest.mark.parametrize(
    "precision,rows,s,m",  # every precision; paired bonds (S = 2) and unpaired edges with M not a power of two
    [("fp32", 37, 2, 32), ("bf16", 37, 2, 32), ("tf32", 21, 1, 12), ("fp16", 21, 1, 12)],
)
def test_fused_messages_and_gradients_match_the_einsum_path(precision, rows, s, m):
    policy = get_policy(precision)
    h, w, t = inputs(rows, s, m=m)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=(rows, s, 6, 5)), jnp.float32)

    def loss(contract):
        return lambda h, w, t: jnp.sum(contract(h, w, t) * cotangent)

    def value_and_grads(contract):  # one compilation of the forward and backward kernels
        return jax.jit(lambda *a: (contract(*a), jax.grad(loss(contract), argnums=(0, 1, 2))(*a)))

    out, g_fused = value_and_grads(lambda h, w, t: fused_messages(h, w, t, policy, SMALL_TILES))(h, w, t)
    expected, g_ref = value_and_grads(lambda h, w, t: reference_messages(h, w, t, policy))(h, w, t)
    assert out.shape == (rows, s, 6, 5) and out.dtype == jnp.float32
    assert relative_error(out, expected) < TOLERANCE[precision]
    for a, b in zip(g_fused, g_ref):
        assert a.shape == b.shape and relative_error(a, b) < 2 * TOLERANCE[precision]


def test_bad_shapes_are_refused():
    h, w, t = inputs(8, 1)
    with pytest.raises(ValueError, match="mismatched shapes"):
        fused_messages(h, w[:, :-1], t, get_policy("fp32"))


def lowered_text(fn, *args, platform: str) -> str:
    try:
        return jax.jit(fn).trace(*args).lower(lowering_platforms=(platform,)).as_text()
    except RuntimeError as error:
        # JAX >= 0.11 compiles each Triton kernel to PTX while lowering, through a handler the
        # CUDA plugin registers: a CPU-only install cannot lower Pallas Triton for cuda at all
        if "Triton compilation handler" in str(error):
            pytest.skip(f"this JAX ({jax.__version__}) lowers Triton kernels for cuda only with its CUDA plugin")
        raise


def test_interpret_follows_the_lowering_platform():
    h, w, t = inputs(40, 2)
    policy = get_policy("bf16")

    def forward(interpret):
        return lambda h, w, t: fused_messages(h, w, t, policy, SMALL_TILES, interpret=interpret)

    def value_and_grads(h, w, t):
        return jax.value_and_grad(lambda *a: jnp.sum(forward(None)(*a) ** 2), argnums=(0, 1, 2))(h, w, t)

    cuda = lowered_text(value_and_grads, h, w, t, platform="cuda")
    assert gpu_kernel_calls(cuda) == 3  # forward, dh/dt, weight gradient
    assert "stablehlo.while" not in cuda  # interpret mode runs the grid as a loop
    cpu = lowered_text(forward(None), h, w, t, platform="cpu")
    assert gpu_kernel_calls(cpu) == 0 and "stablehlo.while" in cpu
    forced = lowered_text(forward(True), h, w, t, platform="cuda")
    assert gpu_kernel_calls(forced) == 0 and "stablehlo.while" in forced


def test_real_shapes_lower_for_cuda():
    """The largest group of a hidden layer at batch 240 (5,024 bonds, J = 512, K = 7), bf16,
    with the default tiles (``scripts/check_kernel.py`` compiles these for sm_90)."""
    args = (
        jax.ShapeDtypeStruct((5024, 32), jnp.float32),
        jax.ShapeDtypeStruct((32, 32 * 512), jnp.float32),
        jax.ShapeDtypeStruct((5024, 2, 512, 7), jnp.float32),
    )
    loss = lambda h, w, t: jnp.sum(fused_messages(h, w, t, get_policy("bf16")))  # noqa: E731
    text = lowered_text(jax.value_and_grad(loss, argnums=(0, 1, 2)), *args, platform="cuda")
    assert gpu_kernel_calls(text) == 3 and "stablehlo.while" not in text


def small_model(kernel: str):
    execution = Execution(precision="bf16", kernel=kernel, fuse_level="partial_out")
    return SE3TransformerPooled(num_layers=1, num_channels=8, num_heads=2, execution=execution)


@pytest.mark.parametrize("mode", ["train", "infer"])
def test_model_steps_lower_to_gpu_kernels_for_cuda(mode):
    """Lowered for ``cuda`` on this CPU host, the model's steps with ``kernel="pallas"`` hold
    the Triton kernels and no interpret-mode loops: exactly the loops of the XLA path."""
    batch = synthetic_batch(np.random.default_rng(0), 3)
    optimizer = optax.adam(1e-3)
    # abstract parameters and state: nothing runs, only the lowering
    params = jax.eval_shape(small_model("xla").init, jax.random.PRNGKey(0), batch)
    state = jax.eval_shape(lambda p: create_train_state(small_model("xla"), optimizer, batch, None, params=p), params)
    texts = {}
    for kernel in ("pallas", "xla"):
        model = small_model(kernel)
        if mode == "train":
            texts[kernel] = lowered_text(make_train_step(model), state, batch, platform="cuda")
        else:
            texts[kernel] = lowered_text(model.apply, state.params, batch, platform="cuda")
    assert gpu_kernel_calls(texts["xla"]) == 0
    assert gpu_kernel_calls(texts["pallas"]) > 0
    assert texts["pallas"].count("stablehlo.while") == texts["xla"].count("stablehlo.while")


def conv_edges(graphs, positions):
    return edge_inputs(
        positions,
        graphs.senders,
        graphs.receivers,
        3,
        graphs.edges[FEATURES].astype(positions.dtype),
        padding_masks(graphs).edges,
    )


def test_convolution_with_the_kernel_is_equivariant_and_equal(small_batch, rotations, x64):
    """Degrees 0-3 fused into one group (``full``: one kernel to compile, K = 16 output
    components; the ragged shapes are the agreement test's)."""
    fiber = Fiber.create(4, 4)
    positions = jnp.asarray(small_batch.nodes[POSITIONS], jnp.float64)
    features = {
        d: jnp.asarray(np.random.default_rng(d).normal(size=(positions.shape[0], 4, 2 * d + 1))) for d in range(4)
    }
    fused = ConvSE3(fiber, fiber, execution=Execution(precision="fp64", kernel="pallas", fuse_level="full"))
    einsum = ConvSE3(fiber, fiber, execution=Execution(precision="fp64", kernel="xla", fuse_level="full"))
    # the same parameters whatever the kernel: initialised through the einsums (an eager
    # interpret-mode kernel is slow)
    params = init_params(einsum, jax.random.PRNGKey(0), features, conv_edges(small_batch, positions))
    fn = jax.jit(lambda p, f: fused.apply(params, f, conv_edges(small_batch, p)))
    assert_equivariant(fn, positions, features, rotations[:3], rtol=1e-9)
    expected = jax.jit(lambda p, f: einsum.apply(params, f, conv_edges(small_batch, p)))(positions, features)
    for d in expected:
        assert relative_error(fn(positions, features)[d], expected[d]) < 1e-12
