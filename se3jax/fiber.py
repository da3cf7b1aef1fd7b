"""Fibers: which degrees a feature has, and how many channels of each.

A feature of degree ``d`` has ``2d + 1`` components. Node features are held per degree as
arrays ``[N, C_d, 2d + 1]`` in a ``dict`` keyed by degree.

>>> f = Fiber({0: 32, 1: 32, 2: 32, 3: 32})
>>> f.degrees, f.num_features, f.uniform_channels, f.is_contiguous
((0, 1, 2, 3), 512, 32, True)
>>> Fiber.create(num_degrees=2, channels=4) + Fiber({0: 2})
Fiber({0: 6, 1: 4})
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from typing import Any

# Per-degree node (or edge) features: degree d -> array [N, C_d, 2d + 1].
Features = dict[int, Any]


def degree_dim(degree: int) -> int:
    """Number of components of a degree-``degree`` feature."""
    return 2 * degree + 1


@dataclasses.dataclass(frozen=True)
class Fiber:
    """An immutable, hashable map degree -> channels (hashable so Flax modules can hold it)."""

    structure: tuple[tuple[int, int], ...]

    def __init__(self, structure: Mapping[int, int] | tuple[tuple[int, int], ...]):
        items = structure.items() if isinstance(structure, Mapping) else structure
        items = tuple(sorted((int(d), int(c)) for d, c in items))
        for d, c in items:
            if d < 0 or c <= 0:
                raise ValueError(f"Fiber needs degrees >= 0 and channels > 0, got {dict(items)}")
        if len({d for d, _ in items}) != len(items):
            raise ValueError(f"Fiber has a repeated degree: {items}")
        if not items:
            raise ValueError("Fiber needs at least one degree")
        object.__setattr__(self, "structure", items)

    @classmethod
    def create(cls, num_degrees: int, channels: int) -> Fiber:
        """Degrees ``0 .. num_degrees - 1``, each with ``channels`` channels."""
        return cls({d: channels for d in range(num_degrees)})

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(d for d, _ in self.structure)

    @property
    def max_degree(self) -> int:
        return self.structure[-1][0]

    @property
    def num_features(self) -> int:
        """Total size of a feature: sum over degrees of channels x (2d + 1)."""
        return sum(c * degree_dim(d) for d, c in self.structure)

    @property
    def num_components(self) -> int:
        """Size of the degree-fused component axis: sum over degrees of (2d + 1)."""
        return sum(degree_dim(d) for d in self.degrees)

    @property
    def uniform_channels(self) -> int | None:
        """The common channel count if every degree has the same, else None."""
        counts = {c for _, c in self.structure}
        return counts.pop() if len(counts) == 1 else None

    @property
    def is_contiguous(self) -> bool:
        """Degrees are exactly ``0 .. max_degree``."""
        return self.degrees == tuple(range(self.max_degree + 1))

    def __getitem__(self, degree: int) -> int:
        return dict(self.structure)[degree]

    def __contains__(self, degree: int) -> bool:
        return degree in self.degrees

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self.structure)

    def items(self) -> tuple[tuple[int, int], ...]:
        return self.structure

    def __add__(self, other: Fiber) -> Fiber:
        """Union of degrees; channels of a shared degree add up (concatenation)."""
        merged = dict(self.structure)
        for d, c in other.structure:
            merged[d] = merged.get(d, 0) + c
        return Fiber(merged)

    def __floordiv__(self, divisor: int) -> Fiber:
        return Fiber({d: max(c // divisor, 1) for d, c in self.structure})

    def restrict(self, degrees) -> Fiber:
        """The degrees of this fiber that are also in ``degrees``."""
        keep = set(degrees)
        return Fiber({d: c for d, c in self.structure if d in keep})

    def check_features(self, features: Mapping[int, object], name: str = "features") -> None:
        """Raise a clear ValueError unless ``features`` match this fiber, ``[N, C_d, 2d+1]``."""
        if not isinstance(features, Mapping):
            raise ValueError(f"{name} must be a dict degree -> [N, C, 2d+1] array, got {type(features)}")
        if set(features) != set(self.degrees):
            raise ValueError(
                f"{name} have degrees {sorted(features)}, but the fiber {self!r} expects {list(self.degrees)}"
            )
        n = None
        for d, c in self.structure:
            shape = tuple(features[d].shape)
            if len(shape) != 3 or shape[1:] != (c, degree_dim(d)):
                raise ValueError(
                    f"{name}[{d}] has shape {shape}, expected [N, {c}, {degree_dim(d)}] for fiber {self!r}"
                )
            if n is not None and shape[0] != n:
                raise ValueError(f"{name} disagree on the number of nodes: {n} vs {shape[0]} (degree {d})")
            n = shape[0]

    def __repr__(self) -> str:
        return f"Fiber({dict(self.structure)})"
