"""Thin entry for those working in the repo: ``torchrun ... launch/train.py --config run.yaml``.

The same as the module entry ``torchrun ... -m dsft.run --config run.yaml`` (which works wherever dsft is
installed); see dsft/run.py.
"""

import sys

from dsft.run import main

if __name__ == "__main__":
    sys.exit(main())
