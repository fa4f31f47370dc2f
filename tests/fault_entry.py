"""Test-only launcher entry: the module entry ``dsft.run`` plus faults injected from the environment.

``DSFT_TEST_FAULTS`` (JSON) selects them; production code has no such switch:

- ``{"slow_save": {"step": N, "seconds": S}}``: while checkpoint-N is being written (after the model and the
  optimizer / DeepSpeed shards, before the RNG states and trainer_state.json), every rank touches
  ``<output_dir>/slow-save-rank<R>`` and sleeps S seconds — the test kills the processes in that window.
- ``{"poison": {"step": N, "rank": R}}``: from optimizer step N on, rank R sets one output-embedding weight
  to NaN before the step, so that rank's loss (and every rank's gradients) become non-finite the way a
  diverged weight would make them.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import Trainer, TrainerCallback

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

FAULTS = json.loads(os.environ.get("DSFT_TEST_FAULTS", "{}"))


def install_slow_save(step: int, seconds: float) -> None:
    original = Trainer._save_rng_state

    def slow(self, output_dir):
        if self.state.global_step == step:
            Path(self.args.output_dir, f"slow-save-rank{self.args.process_index}").touch()
            time.sleep(seconds)
        return original(self, output_dir)

    Trainer._save_rng_state = slow


class Poison(TrainerCallback):
    def __init__(self, step: int, rank: int) -> None:
        self.step, self.rank = step, rank

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step + 1 >= self.step and args.process_index == self.rank:
            with torch.no_grad():
                model.get_output_embeddings().weight[0, 0] = float("nan")


def main() -> int:
    import dsft.train
    from dsft.run import main as launch_main

    extra = []
    if "slow_save" in FAULTS:
        install_slow_save(**FAULTS["slow_save"])
    if "poison" in FAULTS:
        extra.append(Poison(**FAULTS["poison"]))
    real_run = dsft.train.run

    def run_with_faults(cfg, callbacks=(), **kwargs):
        return real_run(cfg, [*callbacks, *extra], **kwargs)

    dsft.train.run = run_with_faults  # dsft.run imports run from dsft.train when it is called
    return launch_main()


if __name__ == "__main__":
    sys.exit(main())
