"""Installed as the package ``dsft.templates.slurm`` (pyproject's package-dir): this file makes the directory
importable under an editable install too, so ``importlib.resources`` finds the sbatch templates in both."""
