"""Installed as the package ``dsft.templates.ds_configs`` (pyproject's package-dir): this file makes the directory
importable under an editable install too, so ``importlib.resources`` finds the JSON templates in both."""
