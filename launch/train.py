"""Thin entry for launchers: ``torchrun ... launch/train.py --config run.yaml``."""

import sys

from dsft.cli import launch_main

if __name__ == "__main__":
    sys.exit(launch_main())
