"""Write ``se3jax/clebsch_gordan.npz``: e3nn-jax's Clebsch-Gordan coefficients for every
coupling of degrees 0..3 (the paths and harmonics of models up to degree 3) and the harmonics
recursion's (l, 1, l + 1) up to l = 7.

    python scripts/clebsch_gordan_table.py

se3jax.basis reads them from the table, so a process that builds a model does not import
e3nn-jax (2.4 s: it imports scipy.signal and sympy); other triples come from e3nn-jax.
tests/test_basis.py checks that the table equals e3nn-jax's numbers.
"""

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from se3jax.basis import CLEBSCH_GORDAN_TABLE, clebsch_gordan_table_triples, e3nn_clebsch_gordan  # noqa: E402


def main() -> None:
    table = {f"{a}_{b}_{j}": e3nn_clebsch_gordan(a, b, j) for a, b, j in clebsch_gordan_table_triples()}
    np.savez_compressed(CLEBSCH_GORDAN_TABLE, **table)
    print(f"{len(table)} triples -> {CLEBSCH_GORDAN_TABLE} ({CLEBSCH_GORDAN_TABLE.stat().st_size:,} bytes)")


if __name__ == "__main__":
    main()
