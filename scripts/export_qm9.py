"""Write the processed QM9 dataset as one portable, compressed, versioned file (32.6 MB for
all 130,831 molecules) with a SHA-256 checksum beside it, for machines without RDKit, qm9pack or
internet (a GPU job, a cluster node). Point ``cache_dir`` at the folder that holds it.

    python scripts/export_qm9.py --out data/            # data/qm9_portable_v3.npz (+ .sha256)
    python train/main.py --config configs/qm9_fast.py --config.cache_dir=data/
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from se3jax.data.qm9_cache import DEFAULT_CACHE_DIR, PORTABLE_FILE, export_portable, load_or_build_cache  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for the portable file")
    parser.add_argument("--cache-dir", default=DEFAULT_CACHE_DIR, help="where QM9 is (or gets) processed")
    parser.add_argument("--max-molecules", type=int, default=None, help="only the first K molecules")
    args = parser.parse_args(argv)
    arrays = load_or_build_cache(args.cache_dir, args.max_molecules)
    path = args.out / PORTABLE_FILE
    digest = export_portable(arrays, path)
    print(
        f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB, {len(arrays['molecule_ids'])} molecules), sha256 {digest}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
