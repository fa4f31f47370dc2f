"""Entry for tests and benchmarks: several run configs one after another in ONE launched process group.

    torchrun --nproc_per_node 2 launch/run_configs.py a.yaml b.yaml [--model-states]

Each config goes through the same ``dsft.train.run`` as ``launch/train.py``. Starting a launcher costs ~15 s of
imports and rendezvous per launch on 2 cores, which would dominate a matrix of short runs. ``--model-states``
adds the callback that counts held model-state bytes (``dsft.memory``).
"""

import sys

from dsft.cli import run_configs_main

if __name__ == "__main__":
    sys.exit(run_configs_main())
