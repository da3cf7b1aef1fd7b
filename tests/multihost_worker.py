"""One process of a multi-process training run on simulated CPU devices (tests/test_multihost.py).

    python tests/multihost_worker.py SPEC_JSON

SPEC: {"devices": simulated CPU devices of this process, "config": overrides of configs/test.py,
"workdir": ..., "record": a JSON-lines file for this process's per-step records,
"hang_after_step": null or a step after which this process stops responding, as a stuck or
preempted host would, until it is killed}. Each step
records the global step, the data position and a hash of the parameters; files this process
opens for writing under the workdir are recorded too (a Python audit hook).
"""

import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path


def main(spec: dict) -> None:
    # this process's device count; the suite's other flags (tests/conftest.py) stay
    inherited = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    os.environ["XLA_FLAGS"] = " ".join([*inherited, f"--xla_force_host_platform_device_count={spec['devices']}"])
    os.environ["JAX_PLATFORMS"] = "cpu"
    sys.path.insert(0, str(REPO))
    import jax  # after XLA_FLAGS: the simulated device count is read when JAX starts
    import numpy as np

    from se3jax.training.config import load_config_file
    from se3jax.training.train import train_and_evaluate

    logging.basicConfig(level=logging.INFO)
    logging.getLogger().setLevel(logging.INFO)  # after absl's import, which may have lowered it
    config = load_config_file(REPO / "configs" / "test.py")
    for key, value in spec["config"].items():
        config[key] = value
    workdir = str(Path(spec["workdir"]).absolute())
    record = open(spec["record"], "a")

    def write(**data):
        record.write(json.dumps(data) + "\n")
        record.flush()

    def audit(event, args):
        # files this process opens for writing in the workdir (Python-level writes)
        if event == "open" and isinstance(args[0], str) and args[0].startswith(workdir):
            mode = args[1] if len(args) > 1 and isinstance(args[1], str) else "r"
            if any(c in mode for c in "wax+"):
                write(kind="write", path=os.path.relpath(args[0], workdir))

    sys.addaudithook(audit)

    def on_step(step, state, position):
        digest = hashlib.sha256()
        for leaf in jax.tree.leaves(state.params):
            digest.update(np.asarray(leaf.addressable_data(0)).tobytes())
        write(kind="step", step=int(step), epoch=position.epoch, batch=position.batch, params=digest.hexdigest())
        if step == spec.get("hang_after_step"):
            time.sleep(3600)  # its background threads (heartbeats, checkpoint saves) go on

    result = train_and_evaluate(config, workdir, hooks=[on_step])
    write(kind="result", process=jax.process_index(), **{k: float(v) for k, v in result.items()})


REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    main(json.loads(sys.argv[1]))
