"""Where the packaged templates are: the DeepSpeed JSONs (``ds_configs/`` in the repo) and the sbatch scripts
(``slurm/``), installed as the sub-packages ``dsft.templates.ds_configs`` / ``dsft.templates.slurm``.

pyproject maps those package names onto the repo's top-level folders, so the folders stay the only copy, a wheel
carries them, and an editable install finds them in place. Each kind has an environment override for a
user's own copy.
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path

# kind -> (sub-package, environment override)
KINDS = {
    "ds_configs": ("dsft.templates.ds_configs", "DSFT_DS_CONFIGS"),
    "slurm": ("dsft.templates.slurm", "DSFT_SLURM_TEMPLATES"),
}


def directory(kind: str) -> Path:
    """The directory holding the templates of ``kind`` (``ds_configs`` | ``slurm``): the environment override if
    set, else the installed package data. A missing sub-package (an editable install made before the mapping
    existed: reinstall) gives a path that does not exist, so callers report "no templates found in ..." instead of
    failing at import."""
    package, env = KINDS[kind]
    if os.environ.get(env):
        return Path(os.environ[env])
    try:
        # pip installs wheels unpacked, so this is a real directory (not a zip member)
        return Path(str(importlib.resources.files(package)))
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent / kind
