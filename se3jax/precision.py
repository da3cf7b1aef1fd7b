"""Precision policies and dynamic loss scaling.

A policy fixes the dtype of the large contractions (radial weights, TFN and attention
einsums). Parameters always stay float32; norms, softmax and segment sums accumulate in
float32 (reduced-precision contractions ask XLA for float32 results).

>>> get_policy("bf16").compute_dtype
dtype(bfloat16)
>>> get_policy("fp16").needs_loss_scaling
True
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

POLICIES = ("fp32", "bf16", "fp16", "fp64")  # fp64: for tests and debugging


@dataclasses.dataclass(frozen=True)
class Policy:
    name: str
    compute_dtype: np.dtype

    @property
    def needs_loss_scaling(self) -> bool:
        """fp16 has a narrow exponent range: gradients underflow without loss scaling."""
        return self.name == "fp16"

    @property
    def accumulation_dtype(self) -> np.dtype:
        return accumulation_dtype(self.compute_dtype)

    def cast(self, x: jax.Array) -> jax.Array:
        return x.astype(self.compute_dtype)


def accumulation_dtype(compute_dtype) -> np.dtype:
    """Contractions in ``compute_dtype`` produce (and sums accumulate in) at least float32."""
    return np.dtype(jnp.promote_types(compute_dtype, jnp.float32))


def at_least_f32(x: jax.Array) -> jax.Array:
    """``x`` as a JAX array in float32, or kept in float64 if it already is (norms, softmax,
    sums)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def get_policy(policy: "str | Policy") -> Policy:
    """The policy named ``fp32``, ``bf16`` or ``fp16`` (a Policy is passed through)."""
    if isinstance(policy, Policy):
        return policy
    dtypes = {"fp32": jnp.float32, "bf16": jnp.bfloat16, "fp16": jnp.float16, "fp64": jnp.float64}
    if policy not in dtypes:
        raise ValueError(f"unknown precision {policy!r}; choose one of {POLICIES}")
    return Policy(policy, np.dtype(dtypes[policy]))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DynamicLossScale:
    """Loss scaling for fp16: multiply the loss by ``scale`` before differentiating, divide
    the gradients after. On a non-finite gradient the step is skipped and the scale halved;
    after ``period`` finite steps in a row it doubles.

    >>> s = DynamicLossScale.create(initial_scale=2.0**15)
    >>> s = s.adjust(jnp.array(False))
    >>> float(s.scale)
    16384.0
    """

    scale: jax.Array
    good_steps: jax.Array
    period: int = dataclasses.field(default=2000, metadata=dict(static=True))
    factor: float = dataclasses.field(default=2.0, metadata=dict(static=True))

    @classmethod
    def create(cls, initial_scale: float = 2.0**15, period: int = 2000) -> "DynamicLossScale":
        return cls(jnp.asarray(initial_scale, jnp.float32), jnp.zeros((), jnp.int32), period)

    def scale_loss(self, loss: jax.Array) -> jax.Array:
        return loss * self.scale.astype(loss.dtype)

    def unscale(self, grads):
        return jax.tree.map(lambda g: g / self.scale.astype(g.dtype), grads)

    def adjust(self, grads_finite: jax.Array) -> "DynamicLossScale":
        grow = self.good_steps + 1 >= self.period
        new_scale = jnp.where(grads_finite,
                              jnp.where(grow, self.scale * self.factor, self.scale),
                              jnp.maximum(self.scale / self.factor, 1.0))
        new_good = jnp.where(grads_finite, jnp.where(grow, 0, self.good_steps + 1), 0)
        return dataclasses.replace(self, scale=new_scale, good_steps=new_good)


def all_finite(tree) -> jax.Array:
    """True iff every leaf of ``tree`` is finite (a scalar bool array)."""
    leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
    return jnp.stack(leaves).all() if leaves else jnp.array(True)
