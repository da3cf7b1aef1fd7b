"""Precision policies (fp16 training adds Flax's dynamic loss scaling: se3jax.training.steps).

A policy fixes the dtype of the contractions (radial weights, TFN and attention einsums, the
dense layers) and the matmul precision each of them asks for. Parameters always stay float32;
norms, softmax and segment sums accumulate in float32 (reduced-precision contractions ask XLA
for float32 results).

- ``fp32``: float32 operands and float32 arithmetic on every backend. Each contraction asks for
  ``Precision.HIGHEST`` itself, so a GPU's TensorFloat-32 default (or a global
  ``jax_default_matmul_precision`` set by a user's pipeline) cannot lower it.
- ``tf32``: float32 storage; contractions ask for ``Precision.HIGH``: TensorFloat-32 on NVIDIA
  GPUs (10-bit mantissa inputs, float32 accumulation), plain float32 on a CPU.
- ``bf16`` / ``fp16``: contractions in bfloat16 / float16 with float32 results; fp16 needs
  dynamic loss scaling.
- ``fp64``: float64 everywhere (tests and debugging; needs ``jax_enable_x64``).

>>> get_policy("bf16").compute_dtype
dtype(bfloat16)
>>> get_policy("fp16").needs_loss_scaling
True
>>> get_policy("fp32").dot_precision.name, get_policy("tf32").dot_precision.name
('HIGHEST', 'HIGH')
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("fp32", "tf32", "bf16", "fp16", "fp64")  # fp64: for tests and debugging
TRAINING_POLICIES = ("fp32", "tf32", "bf16", "fp16")

_DTYPES = {"fp32": jnp.float32, "tf32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16, "fp64": jnp.float64}
_DOT_PRECISION = {
    "fp32": jax.lax.Precision.HIGHEST,
    "tf32": jax.lax.Precision.HIGH,
    "bf16": jax.lax.Precision.DEFAULT,
    "fp16": jax.lax.Precision.DEFAULT,
    "fp64": jax.lax.Precision.HIGHEST,
}


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    compute_dtype: np.dtype
    dot_precision: jax.lax.Precision

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 has a narrow exponent range: gradients underflow without loss scaling."""
        return self.name == "fp16"

    @property
    def accumulation_dtype(self) -> np.dtype:
        return accumulation_dtype(self.compute_dtype)

    def cast(self, x: jax.Array) -> jax.Array:
        return x.astype(self.compute_dtype)

    def einsum(self, spec: str, *operands, wide_result: bool = True) -> jax.Array:
        """A contraction under this policy: operands cast to the compute dtype, the policy's
        matmul precision, and a float32 (at least) result -- or, with ``wide_result=False``,
        a result in the compute dtype (for large intermediates such as the radial weights).

        >>> get_policy("bf16").einsum("ij,jk->ik", jnp.ones((2, 3)), jnp.ones((3, 2))).dtype
        dtype('float32')
        """
        out_dtype = self.accumulation_dtype if wide_result else self.compute_dtype
        return jnp.einsum(
            spec, *(self.cast(x) for x in operands), precision=self.dot_precision, preferred_element_type=out_dtype
        )


def accumulation_dtype(compute_dtype) -> np.dtype:
    """Contractions in ``compute_dtype`` produce (and sums accumulate in) at least float32."""
    return np.dtype(jnp.promote_types(compute_dtype, jnp.float32))


def at_least_f32(x: jax.Array) -> jax.Array:
    """``x`` as a JAX array in float32, or kept in float64 if it already is (norms, softmax,
    sums)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def get_policy(policy: str | Policy) -> Policy:
    """The policy named ``fp32``, ``tf32``, ``bf16``, ``fp16`` or ``fp64`` (a Policy is passed
    through)."""
    if isinstance(policy, Policy):
        return policy
    if policy not in _DTYPES:
        raise ValueError(f"unknown precision {policy!r}; choose one of {POLICIES}")
    return Policy(policy, np.dtype(_DTYPES[policy]), _DOT_PRECISION[policy])
