"""Native bf16 detection and `model.dtype: auto` (the faster precision of the machine that trains)."""

from __future__ import annotations

import pytest

from dsft import precision as Pr
from dsft.config import from_dict, validate
from dsft.errors import ConfigError

# first lines of real /proc/cpuinfo files, trimmed
EPYC_GENOA = "processor\t: 0\nvendor_id\t: AuthenticAMD\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_bf16\n"
SAPPHIRE_RAPIDS = "processor\t: 0\nflags\t\t: avx2 avx512f avx512_bf16 amx_bf16 amx_tile amx_int8\n"
AMX_ONLY = "flags\t\t: avx2 avx512f amx_bf16 amx_tile\n"  # listed apart, each alone is enough
SKYLAKE_AVX512 = "processor\t: 0\nflags\t\t: fpu sse2 avx2 avx512f avx512bw avx512_vnni\n"
HASWELL = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"  # arm64 spells it Features; bf16 is not x86's


@pytest.mark.parametrize("cpuinfo, native", [
    (EPYC_GENOA, True), (SAPPHIRE_RAPIDS, True), (AMX_ONLY, True),
    (SKYLAKE_AVX512, False), (HASWELL, False), (GRAVITON3, False), ("", False),
])
def test_native_bf16_from_cpu_flags(cpuinfo, native):
    assert Pr.cpu_has_native_bf16(Pr.cpu_flags(cpuinfo)) is native


def test_flag_names_are_whole_words():
    # "avx512_bf16" must not be found inside another flag's name, nor "avx512bw" read as bf16
    assert not Pr.cpu_has_native_bf16({"avx512_bf16x", "xamx_bf16", "avx512bw"})
    assert Pr.cpu_flags(SAPPHIRE_RAPIDS) >= {"amx_bf16", "avx512_bf16", "avx2"}


def _cfg(tmp_path, tiny_model_dir, **train):
    (tmp_path / "t.jsonl").write_text('{"prompt": "a", "completion": "b"}\n')
    cfg = from_dict({"model": {"name_or_path": str(tiny_model_dir), "dtype": "auto"},
                     "data": {"train": str(tmp_path / "t.jsonl"), "format": "prompt_completion"},
                     "train": {"output_dir": str(tmp_path / "out"), **train}})
    validate(cfg)
    return cfg


@pytest.mark.parametrize("native, dtype, bf16", [(True, "bf16", True), (False, "fp32", False)])
def test_auto_resolves_to_the_faster_precision(tmp_path, tiny_model_dir, monkeypatch, native, dtype, bf16):
    monkeypatch.setattr(Pr, "native_bf16", lambda device=None: native)
    cfg = Pr.resolve_auto_dtype(_cfg(tmp_path, tiny_model_dir))
    assert cfg.model.dtype == dtype and cfg.train["bf16"] is bf16
    # an explicit train.bf16 is the user's: kept as written
    cfg = Pr.resolve_auto_dtype(_cfg(tmp_path, tiny_model_dir, bf16=False))
    assert cfg.model.dtype == dtype and cfg.train["bf16"] is False
    # a concrete dtype is never touched
    fixed = _cfg(tmp_path, tiny_model_dir)
    fixed.model.dtype = "fp32"
    assert Pr.resolve_auto_dtype(fixed) is fixed


def test_auto_with_fp16_is_refused(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match=r"train.fp16 with model.dtype=auto"):
        _cfg(tmp_path, tiny_model_dir, fp16=True)


def test_plan_resolves_auto_for_the_planned_hardware(tmp_path, tiny_model_dir, monkeypatch):
    from dsft import plan as P

    monkeypatch.setattr(Pr, "native_bf16", lambda device=None: False)  # this CPU: no native bf16
    cfg = _cfg(tmp_path, tiny_model_dir)
    gpu = P.plan(cfg, P.Hardware(accelerator="H100"))  # a GPU with bf16: bf16 weights, whatever this CPU has
    assert gpu.configured_memory.weights == pytest.approx(2 * gpu.shape.params)
    assert P.precision_of(Pr.resolve_auto_dtype(cfg, "bf16"), None).weight_bytes == 2
    assert P.precision_of(Pr.resolve_auto_dtype(cfg), None).weight_bytes == 4
