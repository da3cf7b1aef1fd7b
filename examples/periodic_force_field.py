"""A force field for a periodic box, learned from forces: the se3jax trunk (one scalar energy
per atom, summed) on radius graphs built inside ``jit`` at every step (vesin on a CPU, the
cell list on an accelerator: ``se3jax.neighbours.build_radius_graph``),
with periodic image shifts in the edge vectors; forces are ``-dE/dx``, fitted to the forces of
a Lennard-Jones argon crystal (ASE's calculator) shaken thermally. Needs ``ase``.

    python examples/periodic_force_field.py                    # 2,916 atoms (9x9x9 fcc cells)
    python examples/periodic_force_field.py --repeat 3 --steps 200

Prints the force error (mean squared error per component, (eV/A)^2) against the do-nothing
baseline (the mean squared force), and checks that predicted forces rotate with the box.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402
from ase.build import bulk  # noqa: E402
from ase.calculators.lj import LennardJones  # noqa: E402

from se3jax.edges import edge_inputs  # noqa: E402
from se3jax.fiber import Fiber  # noqa: E402
from se3jax.initialisation import init_params  # noqa: E402
from se3jax.model import SE3Transformer  # noqa: E402
from se3jax.neighbours import build_radius_graph  # noqa: E402
from se3jax.testing import random_rotations, relative_error  # noqa: E402

CUTOFF = 5.5  # A: first and second fcc shells (18 neighbours)
MAX_NEIGHBOURS = 32
SHAKE = 0.15  # A, per coordinate


def model() -> SE3Transformer:
    return SE3Transformer(Fiber({0: 1}), Fiber.create(2, 8), Fiber({0: 1}), num_layers=1, num_heads=2)


def argon_boxes(repeat: int, count: int, seed: int = 0):
    """``count`` shaken copies of a periodic fcc argon box and their Lennard-Jones forces."""
    rng = np.random.default_rng(seed)
    crystal = bulk("Ar", "fcc", a=5.26, cubic=True).repeat(repeat)
    calc = LennardJones(sigma=3.405, epsilon=0.0104, rc=8.0, smooth=True)
    positions, forces = [], []
    for _ in range(count):
        atoms = crystal.copy()
        atoms.positions += rng.normal(scale=SHAKE, size=atoms.positions.shape)
        atoms.calc = calc
        forces.append(atoms.get_forces())
        positions.append(atoms.positions)
    return np.asarray(positions, np.float32), np.asarray(forces, np.float32), np.asarray(crystal.cell[:], np.float32)


def energy(params, positions, cell):
    """The model's energy (eV) of one box; the graph is built here, under jit (from constant
    positions: the edge list is integers, no derivative flows through its construction)."""
    graph = build_radius_graph(
        jax.lax.stop_gradient(positions), CUTOFF, MAX_NEIGHBOURS, cell=cell, pbc=True, bin_capacity=24
    )
    edges = edge_inputs(positions, graph.senders, graph.receivers, 1, mask=graph.mask, shifts=graph.shifts, cell=cell)
    features = {0: jnp.ones((positions.shape[0], 1, 1), positions.dtype)}
    per_atom = model().apply(params, features, edges)[0][:, 0, 0]
    return 0.01 * jnp.sum(per_atom), graph.overflow  # eV scale: forces O(0.01-0.1) eV/A


@jax.jit  # one compiled function for training's loss, the checks below and callers (tests/test_examples.py)
def forces(params, positions, cell):
    grad, overflow = jax.grad(energy, argnums=1, has_aux=True)(params, positions, cell)
    return -grad, overflow


def train(repeat: int = 3, steps: int = 150, configurations: int = 8, learning_rate: float = 3e-3, log_every: int = 50):
    positions, reference, cell = argon_boxes(repeat, configurations)
    cell = jnp.asarray(cell)

    @jax.jit  # one compiled call: op by op, the cell list compiles every primitive on its own
    def first_graph(x):
        graph = build_radius_graph(x, CUTOFF, MAX_NEIGHBOURS, cell=cell, pbc=True, bin_capacity=24)
        edges = edge_inputs(x, graph.senders, graph.receivers, 1, mask=graph.mask, shifts=graph.shifts, cell=cell)
        return graph, edges

    graph, edges = first_graph(positions[0])
    params = init_params(model(), jax.random.PRNGKey(0), {0: jnp.ones((positions.shape[1], 1, 1))}, edges)
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)

    def loss_fn(p, x, f):
        predicted, overflow = forces(p, x, cell)
        return jnp.mean((predicted - f) ** 2), overflow

    @jax.jit
    def step(p, s, x, f):
        (loss, overflow), grads = jax.value_and_grad(loss_fn, has_aux=True)(p, x, f)
        updates, s = optimizer.update(grads, s, p)
        return optax.apply_updates(p, updates), s, loss, overflow

    losses, start = [], time.perf_counter()
    for i in range(steps):
        k = i % configurations
        params, state, loss, overflow = step(params, state, positions[k], reference[k])
        if int(overflow):
            raise RuntimeError(f"neighbour list overflow ({int(overflow)}): raise MAX_NEIGHBOURS or bin_capacity")
        losses.append(float(loss))
        if log_every and (i + 1) % log_every == 0:
            print(f"step {i + 1}: force MSE {np.mean(losses[-log_every:]):.2e} (eV/A)^2", flush=True)
    seconds = time.perf_counter() - start
    # predicted forces rotate with the box (positions and cell rotated together)
    rotation = jnp.asarray(random_rotations(np.random.default_rng(1), 1)[0], jnp.float32)
    f, _ = forces(params, positions[0], cell)
    f_rotated, _ = forces(params, positions[0] @ rotation.T, cell @ rotation.T)
    return dict(
        losses=losses,
        baseline=float(np.mean(reference**2)),
        equivariance_error=relative_error(f_rotated, f @ rotation.T),
        atoms=int(positions.shape[1]),
        edges=int(graph.mask.sum()),
        seconds=seconds,
        params=params,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=9, help="fcc unit cells per side (4 atoms each)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--configurations", type=int, default=8)
    args = parser.parse_args()
    result = train(args.repeat, args.steps, args.configurations)
    print(
        f"{result['atoms']} atoms, {result['edges']} edges: force MSE {np.mean(result['losses'][-20:]):.2e} vs "
        f"baseline {result['baseline']:.2e} (eV/A)^2 after {args.steps} steps ({result['seconds']:.0f} s); "
        f"equivariance error {result['equivariance_error']:.1e}"
    )


if __name__ == "__main__":
    main()
