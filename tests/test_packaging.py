"""dsft as a package: the sdist and the wheel carry the DeepSpeed and sbatch templates and the module entry, and a
wheel installed with its pinned dependencies into a new venv outside the repo validates, renders and trains from
a directory that is not the repo."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import tomllib
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, copy_task_rows, free_port, write_jsonl, write_tiny_model

DS_TEMPLATES = sorted(p.name for p in (REPO / "ds_configs").glob("*.json"))
SBATCH_TEMPLATES = sorted(p.name for p in (REPO / "slurm").glob("*.sbatch"))


def test_pyproject_lists_every_package():
    """The package list is explicit (the template packages are mapped from the repo root, which packages.find
    cannot do): a package directory under dsft/ missing from it would be left out of the wheel."""
    tool = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["tool"]["setuptools"]
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "dsft").rglob("__init__.py")}
    mapped = {name: REPO / d for name, d in tool["package-dir"].items()}
    assert set(tool["packages"]) == on_disk | set(mapped)
    assert mapped == {"dsft.templates.ds_configs": REPO / "ds_configs", "dsft.templates.slurm": REPO / "slurm"}
    assert len(DS_TEMPLATES) >= 7 and SBATCH_TEMPLATES == ["deepspeed.sbatch", "torchrun.sbatch"]


# --------------------------------------------------------------------------------------------------
# built and installed (integration)

PY = sys.executable  # the repo venv: its setuptools builds (no build isolation, so nothing is fetched to build)


def _run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, cmd))}\n--- stdout\n{proc.stdout[-3000:]}\n" \
                                 f"--- stderr\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def dists(tmp_path_factory) -> dict[str, Path]:
    """An sdist built from a copy of the sources, and the wheel built from that sdist (as pip would)."""
    root = tmp_path_factory.mktemp("dists")
    src = root / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md", "dsft", "ds_configs", "slurm"):
        if (REPO / name).is_dir():
            shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(REPO / name, src / name)
    out = root / "dist"
    out.mkdir()
    _run([PY, "-c", "import sys; from setuptools import build_meta; build_meta.build_sdist(sys.argv[1])", str(out)],
         cwd=src)
    sdist = next(out.glob("dsft-*.tar.gz"))
    _run([PY, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(sdist)], cwd=root)
    return {"sdist": sdist, "wheel": next(out.glob("dsft-*.whl"))}


@pytest.mark.integration
def test_sdist_and_wheel_carry_templates_and_module_entry(dists):
    with tarfile.open(dists["sdist"]) as tar:
        in_sdist = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    with zipfile.ZipFile(dists["wheel"]) as whl:
        in_wheel = set(whl.namelist())
        entry_points = next(whl.read(n).decode() for n in in_wheel if n.endswith(".dist-info/entry_points.txt"))
    assert {f"ds_configs/{n}" for n in DS_TEMPLATES} | {f"slurm/{n}" for n in SBATCH_TEMPLATES} <= in_sdist
    assert {f"dsft/templates/ds_configs/{n}" for n in DS_TEMPLATES} <= in_wheel
    assert {f"dsft/templates/slurm/{n}" for n in SBATCH_TEMPLATES} <= in_wheel
    assert {"dsft/run.py", "dsft/cli.py", "dsft/templates/__init__.py"} <= in_wheel
    assert not any(n.startswith(("launch/", "tests/", "bench/")) for n in in_wheel)  # repo tooling stays out
    assert "dsft = dsft.cli:main" in entry_points


@pytest.fixture(scope="module")
def installed(dists, tmp_path_factory) -> Path:
    """A new venv outside the repo with the wheel and its dependencies, pinned by requirements-ci.txt.

    Constraints (-c), not -r: only what dsft declares (core + the deepspeed and slurm extras) is installed, so a
    dependency missing from pyproject fails here. torch is named in the same command so that the pinned CPU build
    is what resolves (pip never sees a bare "torch" it could satisfy with a CUDA build). --no-compile: byte-
    compiling torch and transformers roughly doubled the install time (79 s vs ~150 s measured on 2 cores)."""
    venv = tmp_path_factory.mktemp("wheel-venv") / "venv"
    started = time.monotonic()
    _run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)])
    _run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-compile", "torch==2.13.0",
          f"{dists['wheel']}[deepspeed,slurm]", "-c", str(REPO / "requirements-ci.txt")])
    print(f"wheel venv installed in {time.monotonic() - started:.0f} s", file=sys.stderr)
    # ~1.6 GB, left to pytest's rotation of its temp roots (it keeps three): deleting it here took 108 s on 2 busy
    # cores, more than the install
    return venv


def _env(venv: Path) -> dict:
    """The environment of a user who activated that venv: nothing of the repo or of the test's venv."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_", "MASTER_", "PYTHON", "VIRTUAL_ENV", "DSFT_"))}
    env.update({"PATH": f"{venv / 'bin'}:{env.get('PATH', '/usr/bin:/bin')}", "VIRTUAL_ENV": str(venv),
                "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1",
                "TOKENIZERS_PARALLELISM": "false"})
    return env


@pytest.mark.integration
def test_installed_wheel_works_outside_the_repo(installed, tmp_path):
    work = tmp_path / "elsewhere"
    work.mkdir()
    env = _env(installed)
    bin_ = installed / "bin"

    def dsft(*args: str) -> subprocess.CompletedProcess:
        started = time.monotonic()
        proc = _run([str(bin_ / "dsft"), *args], cwd=work, env=env, timeout=300)
        print(f"dsft {args[0]}: {time.monotonic() - started:.1f} s", file=sys.stderr)
        return proc

    where = _run([str(bin_ / "python"), "-c", "import dsft, dsft.deepspeed as d, dsft.slurm.sbatch as s; "
                  "print(dsft.__file__, d.TEMPLATES_DIR, s.TEMPLATES_DIR, sep='\\n')"], cwd=work, env=env)
    for path in where.stdout.split():
        assert Path(path).is_relative_to(installed) and not Path(path).is_relative_to(REPO), path

    model = write_tiny_model(work / "model")
    data = write_jsonl(work / "train.jsonl", copy_task_rows(32, seed=2))
    base = {"model": {"name_or_path": str(model), "dtype": "fp32"},
            "data": {"train": data.name, "format": "prompt_completion", "max_seq_len": 32, "packing": True},
            "train": {"output_dir": "out", "max_steps": 2, "per_device_train_batch_size": 2, "logging_steps": 1,
                      "learning_rate": 1e-3, "report_to": "none", "save_strategy": "no", "seed": 0}}
    (work / "zero3.yaml").write_text(yaml.safe_dump({**base, "deepspeed": "zero3"}))
    (work / "run.yaml").write_text(yaml.safe_dump(base))

    # the zero3 template comes from the installed package
    validated = dsft("validate", "zero3.yaml", "--world-size", "2")
    assert "config OK" in validated.stderr and "deepspeed: zero3" in validated.stdout
    ds = json.loads(dsft("ds-config", "zero3.yaml", "--world-size", "2").stdout)
    assert ds["zero_optimization"]["stage"] == 3 and ds["train_batch_size"] == 4

    script = dsft("sbatch", "run.yaml", "--tasks-per-node", "2").stdout  # no DeepSpeed lint: ~8 s less
    launch = script[script.index("srun "):]
    assert " -m dsft.run --config " in launch and str(bin_ / "torchrun") in launch
    assert "launch/train.py" not in script and str(REPO) not in script  # nothing points into a clone
    # (the deepspeed template's `--module dsft.run` is checked in tests/test_slurm.py; both ship: see above)

    # two ranks through the module entry, as those scripts start it
    started = time.monotonic()
    proc = _run([str(bin_ / "torchrun"), "--nproc_per_node", "2", "--master_addr", "127.0.0.1", "--master_port",
                 str(free_port()), "-m", "dsft.run", "--config", "run.yaml"], cwd=work, env=env, timeout=600)
    print(f"torchrun -m dsft.run, 2 ranks: {time.monotonic() - started:.1f} s", file=sys.stderr)
    assert "saved to out" in proc.stdout
    info = json.loads((work / "out" / "dsft_run_info.json").read_text())
    assert info["world_size"] == 2, info
    losses = [r["loss"] for r in map(json.loads, (work / "out" / "dsft_log.jsonl").read_text().splitlines())
              if "loss" in r]
    assert len(losses) == 2 and all(x == x and x > 0 for x in losses)
