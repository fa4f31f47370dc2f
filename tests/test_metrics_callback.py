"""tokens/s and MFU leave out the warm-up steps and average over every measured step (issue 12 point 5)."""

from __future__ import annotations

from types import SimpleNamespace

from dsft import callbacks
from dsft.callbacks import THROUGHPUT_WARMUP_STEPS, MetricsCallback


def test_warmup_steps_are_excluded_and_the_rate_is_cumulative(tmp_path, monkeypatch):
    clock = {"t": 0.0}
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: clock["t"])
    args = SimpleNamespace(output_dir=str(tmp_path), world_size=2, bf16=False, fp16=False)
    state = SimpleNamespace(global_step=0, num_input_tokens_seen=0, is_world_process_zero=True)
    cb = MetricsCallback()
    cb.on_train_begin(args, state, None)
    cb._flops_per_token, cb._peak_flops = 1e3, 1e9  # MFU = tokens/s per device x 1e-6
    logged = []
    # step seconds: a slow first step (set-up), then 1 s per step; 1,000 tokens per step over both ranks
    for step, seconds in enumerate((30.0, 3.0, 1.0, 1.0, 1.0), start=1):
        clock["t"] += seconds
        state.global_step, state.num_input_tokens_seen = step, step * 1000
        cb.on_step_end(args, state, None)
        logs = {"loss": 1.0}
        cb.on_log(args, state, None, logs=logs)
        logged.append(logs)
    assert THROUGHPUT_WARMUP_STEPS == 2
    assert all("tokens_per_second_per_device" not in r and "mfu" not in r for r in logged[:2])
    # steps 3-5 took 1 s each for 1,000 tokens over 2 ranks: 500 tokens/s per device, whatever came before
    for r, measured in zip(logged[2:], (1, 2, 3)):
        assert r["tokens_per_second_per_device"] == 500.0 and r["throughput_steps_measured"] == measured
        assert r["mfu"] == 0.0005
    assert all(r["peak_memory_gb"] > 0 for r in logged)
