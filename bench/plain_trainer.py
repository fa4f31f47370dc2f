"""A plain, hand-written HF Trainer fine-tune: what `bench/vs_plain_trainer.py` compares dsft against.

The same job as the dsft run config there: LoRA (peft) on every linear layer of a causal LM, prompt -> completion
rows (loss on the completion and EOS only), dynamic padding, AdamW, the same seed, batch and steps. Written the way a
user would write it with transformers + peft + datasets directly; it imports nothing from dsft.

    python bench/plain_trainer.py --model DIR --data train.jsonl --out DIR [--steps 8 --batch 4 --max-len 256]
                                  [--activation-checkpointing] [--warmup-steps 2]

Prints one JSON line with the Trainer's metrics (train_runtime, num_input_tokens_seen, losses) and tokens/s over the
steps after the first ``--warmup-steps`` (clock started at the end of that step, stopped at the last step's log: the
definition dsft's own tokens/s uses), absent when the run is not longer than the warm-up.
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from datasets import load_dataset
from peft import LoraConfig, get_peft_model
from transformers import (AutoModelForCausalLM, AutoTokenizer, DataCollatorForSeq2Seq, Trainer, TrainerCallback,
                          TrainingArguments, set_seed)


class Clock(TrainerCallback):
    """Tokens seen and time at the end of the warm-up step, and at every log after it."""

    def __init__(self, warmup: int) -> None:
        self.warmup, self.start, self.last = warmup, None, None

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.warmup:
            self.start = (time.perf_counter(), state.num_input_tokens_seen)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if self.start and logs and "loss" in logs and state.global_step > self.warmup:
            self.last = (time.perf_counter(), state.num_input_tokens_seen, state.global_step)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--max-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--activation-checkpointing", action="store_true")
    p.add_argument("--warmup-steps", type=int, default=2)
    a = p.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(a.model)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token or tokenizer.eos_token

    def tokenize(row: dict) -> dict:
        prompt = tokenizer(row["prompt"])["input_ids"]
        completion = tokenizer(row["completion"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + completion)[: a.max_len]
        labels = ([-100] * len(prompt) + completion)[: a.max_len]
        labels[0] = -100
        return {"input_ids": ids, "attention_mask": [1] * len(ids), "labels": labels}

    data = load_dataset("json", data_files=a.data, split="train")
    data = data.map(tokenize, remove_columns=data.column_names)

    set_seed(a.seed)
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    model.config.use_cache = False
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear",
                                             task_type="CAUSAL_LM"))
    args = TrainingArguments(output_dir=a.out, max_steps=a.steps, per_device_train_batch_size=a.batch,
                             learning_rate=a.lr, logging_steps=1, report_to="none", save_strategy="no", seed=a.seed,
                             include_num_input_tokens_seen="non_padding", use_cpu=True,
                             activation_checkpointing=a.activation_checkpointing)
    clock = Clock(a.warmup_steps)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=-100),
                      callbacks=[clock])
    result = trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    extra = {}
    if clock.start and clock.last:
        extra = {"tokens_per_s_after_warmup": (clock.last[1] - clock.start[1]) / (clock.last[0] - clock.start[0]),
                 "throughput_steps_measured": clock.last[2] - a.warmup_steps}
    print(json.dumps({**result.metrics, "num_input_tokens_seen": trainer.state.num_input_tokens_seen,
                      "losses": losses, **extra}))


if __name__ == "__main__":
    main()
