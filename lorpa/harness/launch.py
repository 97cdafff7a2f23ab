"""What `train.sh` runs: the offline demo, one configuration, or every cell of a table.

    bash train.sh                                   # offline demo: LoRPA vs LoRA on MiniLM
    bash train.sh CONFIG.yaml [--flag value ...]    # one run (GLUE, summarization or causal LM, from the config)
    bash train.sh --table glue-base|PATH [--seeds 1,2,3] [--methods lorpa,lora] [--parallel N] [--flag value ...]
    bash train.sh --table glue-base --launcher slurm --slurm_partition gpu [--slurm_time 8:00:00 ...]

A config that names no model runs the packaged all-MiniLM-L6-v2, which needs no hub access. Flags
the launcher does not know pass through to every run (`--max_train_samples 64` or `=64`).

A run goes through `torchrun` (DDP) when `--nproc N` > 1, or, for a single run or a sequential
sweep, when more than one GPU is visible. A table is a folder of configs (one per task; LoRA
baselines in lora_r<r>/); a sweep skips cells whose results.json exists and resumes interrupted
ones from their latest checkpoint, logs each cell to train.log in its folder, and aggregates the
table at the end. `--parallel N` runs N cells at once, each on its own GPU(s) or share of the CPU.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shlex
import subprocess
import sys
from pathlib import Path

from ..cli import raise_input_error, run_cli
from ..errors import InputError
from ..tasks.demo_data import write_demo_glue
from . import commands
from .commands import ROOT, has_flag, packaged_minilm, read_config, visible_gpus
from .sweep.cells import Cell, write_manifest
from .sweep.local import run_cells, summary
from .sweep.reuse import AFTER_STAGE1_KEYS, link_stage1_runs

DEMO_CONFIG = ROOT / "configs/demo.yaml"
TABLES = {
    "glue-base": ROOT / "configs/glue/roberta-base",
    "glue-large": ROOT / "configs/glue/roberta-large",
    "summarization": ROOT / "configs/summarization/bart-base",
    "glue-minilm": ROOT / "configs/glue/minilm",  # packaged MiniLM; GLUE from the hub or --data_dir
    "gsm8k-llama": ROOT / "configs/clm/llama-3.2-3b",  # peft's MetaMathQA -> GSM8K comparison
    "gsm8k-qwen": ROOT / "configs/clm/qwen2.5-3b",
    "minilm-study": ROOT / "configs/glue/minilm-study",  # the method study: one sub-folder per row
    "minilm-study-long": ROOT / "configs/glue/minilm-study-long",  # its rows at twice the budget
    "minilm-study-screen": ROOT / "configs/glue/minilm-study-screen",  # which tasks tell ranks apart
}
# Configs that read inputs the project generates: (what makes them, relative to the repository root;
# a path the config reads, which is missing until they are made).
GENERATED_INPUTS = {
    "configs/glue/smoke.yaml": (["-m", "lorpa.tasks.demo_data", "runs/smoke-data"], "runs/smoke-data/train.jsonl"),
    "configs/summarization/smoke.yaml": (["scripts/make_tiny_seq2seq.py", "runs/tiny-seq2seq"],
                                         "runs/tiny-seq2seq/data/train.jsonl"),
    "configs/clm/smoke.yaml": (["scripts/make_tiny_llama.py", "runs/tiny-llama"],
                               "runs/tiny-llama/data/gsm8k/train.jsonl"),
}
METHOD_FOLDERS = {"all": ("", "*"), "lorpa": ("", "lorpa_r*"), "lora": ("lora_r*",)}


def single(config: Path, flags: list[str], runs_dir: str | None, nproc: int,
           accelerate_config: Path | None = None) -> None:
    """One run; without an output folder in the flags or config it goes to runs/<config path>."""
    if not has_flag(flags, "--output_dir") and "output_dir" not in read_config(config):
        name = config.relative_to(ROOT / "configs") if config.is_relative_to(ROOT / "configs") else Path(config.name)
        flags = flags + ["--output_dir", str(runs_dir or ROOT / "runs" / name.with_suffix(""))]
    make_generated_inputs(config)
    command = commands.command_for(config, flags, nproc, accelerate_config)
    print("+ " + shlex.join(command), flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def make_generated_inputs(config: Path) -> None:
    """A smoke config run before its generated model and data exist: make them first (seconds)."""
    key = config.relative_to(ROOT).as_posix() if config.is_relative_to(ROOT) else None
    if key not in GENERATED_INPUTS or (ROOT / GENERATED_INPUTS[key][1]).exists():
        return
    command = [sys.executable, *GENERATED_INPUTS[key][0]]
    print(f"{key} reads inputs the project generates; making them first:\n+ {shlex.join(command)}", flush=True)
    subprocess.run(command, check=True, cwd=ROOT)


def report(runs_dir: Path) -> None:
    subprocess.run([sys.executable, "-m", "lorpa.report", str(runs_dir)], check=True, cwd=ROOT)


def run_local(cells: list[Cell], runs_dir: Path, parallel: int, nproc: int) -> None:
    """Run the cells here, then the table of whatever finished; exit status 1 if a cell failed."""
    write_manifest(runs_dir, cells)
    outcome = run_cells(cells, parallel=parallel, nproc=nproc, gpus=visible_gpus(), cwd=ROOT)
    if outcome.finished or outcome.skipped:
        try:
            report(runs_dir)
        except subprocess.CalledProcessError:  # its error is on screen; the summary still says which cells ran
            pass
    print(summary(outcome), flush=True)
    if outcome.failed:
        raise SystemExit(1)


def demo(runs_dir: Path, nproc: int) -> None:
    """LoRPA (r0=64 -> 8) against LoRA r=8, same epochs and steps, on MiniLM and generated reviews.

    LORPA_DEMO_MODEL replaces the model and LORPA_DEMO_FLAGS adds flags (tests shrink the demo so).
    """
    model = os.environ.get("LORPA_DEMO_MODEL") or packaged_minilm()
    data = write_demo_glue(runs_dir / "data")
    flags = ["--model_name_or_path", model, "--train_file", str(data["train"]),
             "--validation_file", str(data["validation"])]
    extra = shlex.split(os.environ.get("LORPA_DEMO_FLAGS", ""))
    config = read_config(DEMO_CONFIG)
    rank = config["prune_target_rank"]  # the baseline trains at LoRPA's final rank with the same alpha/r
    lora_flags = ["--method", "lora", "--lora_r", str(rank),
                  "--lora_alpha", str(config["lora_alpha"] * rank / config["lora_r"])]
    cells = [Cell("lorpa", DEMO_CONFIG, runs_dir / "lorpa", flags + extra),
             Cell("lora", DEMO_CONFIG, runs_dir / "lora", flags + lora_flags + extra)]
    run_local(cells, runs_dir, 1, nproc)
    print(f"\ntable: {runs_dir / 'summary.md'}\nrank plot: {runs_dir / 'lorpa' / 'rank_plot.png'}")


def table_root(table: str) -> Path:
    """A named table or any folder laid out like configs/glue/roberta-base."""
    if table in TABLES:
        return TABLES[table]
    root = Path(table).resolve()
    if not root.is_dir():
        raise InputError(f"--table {table}: neither a named table ({', '.join(TABLES)}) nor a folder of configs")
    return root


def table_cells(table: str, methods: list[str]):
    """(cell name, config) for every config of the table's methods, e.g. ("lora_r8", .../lora_r8/rte.yaml).

    lorpa is the table folder's own YAML files (and lorpa_r<r>/), lora every lora_r<r>/ sub-folder, all
    of them and every other sub-folder (a study's rows); any other method name is a sub-folder of that
    name (a user's own variant, e.g. --methods lorpa,global).
    """
    root = table_root(table)
    for method in methods:
        if method in METHOD_FOLDERS:
            patterns = METHOD_FOLDERS[method]
        elif (root / method).is_dir():
            patterns = (method,)
        else:
            choices = [*METHOD_FOLDERS,
                       *sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("lora_r"))]
            raise InputError(f"unknown method {method!r} for --methods; choose from {', '.join(choices)}")
        for pattern in patterns:
            folders = [root] if not pattern else sorted(p for p in root.glob(pattern) if p.is_dir())
            for folder in folders:
                for config in sorted(folder.glob("*.yaml")):
                    yield ("lorpa" if folder == root else folder.name), config


def sweep_cells(table: str, seeds: list[int], methods: list[str], runs_dir: Path, flags: list[str],
                accelerate_config: Path | None = None) -> list[Cell]:
    """Seed-major order, so that a first seed of the whole table finishes before the next starts; a
    prune-at-the-end cell reuses its LoRA twin's run as stage 1 (sweep/reuse.py)."""
    configs = list(table_cells(table, methods))
    if not configs:
        raise InputError(f"no configs for table {table} and methods {', '.join(methods)}")
    # a broken config is refused before any cell starts
    values = {config: read_config(config) for _, config in configs}
    twins = []  # LoRA rows left out by --methods: an earlier sweep may have finished them
    for name, config in table_cells(table, ["lora"]):
        if config not in values:
            with contextlib.suppress(InputError):  # a broken row that is not run cannot be a twin
                values[config] = read_config(config)
                twins.append((name, config))
    cells = {config: [Cell(f"{name}/{config.stem}/seed{seed}", config, runs_dir / name / config.stem / f"seed{seed}",
                           flags + ["--seed", str(seed)], accelerate_config=accelerate_config) for seed in seeds]
             for name, config in configs + twins}
    # a flag that changes the prune links nothing
    if not any(has_flag(flags, f"--{key}") for key in AFTER_STAGE1_KEYS):
        link_stage1_runs([cell for row in cells.values() for cell in row], values.__getitem__)
    return [cells[config][index] for index in range(len(seeds)) for _, config in configs]


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(seed) for seed in text.split(",")]
    except ValueError:
        raise InputError(f"--seeds {text!r}: expected comma-separated integers, e.g. --seeds 1,2,3") from None
    if len(set(seeds)) != len(seeds):
        raise InputError(f"--seeds {text!r} repeats a seed")
    return seeds


def submit_slurm(cells: list[Cell], runs_dir: Path, args: argparse.Namespace) -> None:
    """One array job for the unfinished cells; with the submitit-local launcher, wait and report."""
    from .sweep import slurm

    slurm.import_submitit()  # a missing extra or a bad option is reported before anything is written
    slurm.minutes(args.slurm_time)
    slurm.sbatch_parameters(tuple(args.slurm_sbatch))
    options = slurm.SlurmOptions(args.slurm_partition, args.slurm_gpus_per_task, args.slurm_cpus_per_task,
                                 args.slurm_time, args.slurm_array_parallelism, tuple(args.slurm_sbatch))
    write_manifest(runs_dir, cells)
    local = args.launcher == "submitit-local"
    jobs, todo = slurm.submit(cells, runs_dir, options, nproc=args.nproc, cluster="local" if local else "slurm")
    if not jobs:
        print("every cell is finished")
        report(runs_dir)
        return
    after_twin = len(slurm.waiting_for_twin(todo))
    print(f"submitted {len(jobs) - after_twin} cells as array job {jobs[0].job_id.split('_')[0]}"
          + (f" and {after_twin} as jobs that start when their LoRA twin's task ends" if after_twin else "")
          + f"; task logs in {runs_dir / slurm.SUBMITIT_FOLDER}, cell logs in each cell's train.log")
    if not local:
        print(f"progress: lorpa report {runs_dir}")
        return
    failed = slurm.wait(jobs, todo)
    report(runs_dir)
    for cell, error in failed:
        print(f"  FAILED   {cell.name}: {error}; log {cell.log}")
    if failed:
        raise SystemExit(1)


def split_config(argv: list[str]) -> tuple[str | None, list[str]]:
    """The config is the first argument when it is not a flag; everything else is flags.

    (An optional positional would swallow the value of a pass-through flag: `--max_train_samples 64`.)
    """
    if argv and not argv[0].startswith("-"):
        return argv[0], argv[1:]
    return None, argv


def refuse_demo_flags(flags: list[str]) -> None:
    """The demo's runs are fixed, so that its table is the one the README describes."""
    configs = [flag for flag in flags if flag.endswith((".yaml", ".yml"))]
    if configs:
        raise InputError(f"give the config first: bash train.sh {configs[0]} [flags]")
    raise InputError(f"the demo (train.sh without a config or --table) takes no run flags, got {flags[0]}; "
                     f"run one config with them: bash train.sh CONFIG.yaml {shlex.join(flags)}")


def build_parser() -> argparse.ArgumentParser:
    """The launcher's own flags; any other flag passes through to the runs."""
    parser = argparse.ArgumentParser(
        prog="train.sh",
        usage="bash train.sh [CONFIG.yaml | --table NAME|PATH] [options] [run flags]",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # else a passed-through `--seed 1` would be taken as `--seeds 1`
    )
    parser.error = raise_input_error
    parser.add_argument("--table", help=f"a table to sweep: {', '.join(TABLES)}, or a folder of configs")
    parser.add_argument("--seeds", default="1,2,3", help="comma-separated seeds for --table")
    parser.add_argument("--methods", default="all",
                        help="comma-separated: all (every config of the table), lorpa (its own configs and "
                             "lorpa_r*/), lora (its lora_r*/ folders), or a sub-folder's name")
    parser.add_argument("--nproc", type=int, default=None,
                        help="processes (GPUs) per run; default: all visible GPUs, 1 with --parallel")
    parser.add_argument("--parallel", type=int, default=1, help="cells of a table run at once (each on its own GPUs)")
    parser.add_argument("--accelerate_config", default=None, metavar="FILE.yaml",
                        help="run every run through `accelerate launch --config_file FILE` (e.g. FSDP: "
                             "configs/accelerate/fsdp.yaml), with --nproc processes or the file's num_processes")
    parser.add_argument("--launcher", choices=("local", "slurm", "submitit-local"), default="local",
                        help="local: this machine; slurm: one SLURM array job through submitit; "
                             "submitit-local: that array job run here by submitit (a check before submitting)")
    slurm = parser.add_argument_group("SLURM (--launcher slurm)")
    slurm.add_argument("--slurm_partition", default=None, help="default: the cluster's default partition")
    slurm.add_argument("--slurm_gpus_per_task", type=int, default=1,
                       help="GPUs per cell (>1: DDP within the cell; 0: CPU only)")
    slurm.add_argument("--slurm_cpus_per_task", type=int, default=None, help="default: the cluster's default")
    slurm.add_argument("--slurm_time", default="24:00:00",
                       help="per cell, as MINUTES, HH:MM:SS or D-HH:MM:SS; a cell still running then is requeued "
                            "and resumes")
    slurm.add_argument("--slurm_array_parallelism", type=int, default=64, help="cells running at once")
    slurm.add_argument("--slurm_sbatch", action="append", default=[], metavar="KEY=VALUE",
                       help="an extra #SBATCH --KEY=VALUE line (repeatable), e.g. account=myproject")
    parser.add_argument("--runs_dir", default=None, help="where runs go (default: runs/<demo|table|config>)")
    return parser


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    config, rest = split_config(list(sys.argv[1:] if argv is None else argv))
    args, flags = parser.parse_known_args(rest)
    for name in ("nproc", "parallel", "slurm_array_parallelism"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise InputError(f"--{name} must be a positive integer, got {value}")
    accelerate_config = None
    if args.accelerate_config is not None:
        accelerate_config = Path(args.accelerate_config).resolve()
        if not accelerate_config.is_file():
            raise InputError(f"--accelerate_config {args.accelerate_config}: no such file "
                             "(see configs/accelerate/fsdp.yaml)")
        commands.accelerate_processes(accelerate_config)  # a malformed file stops here, in one line
    if args.table:
        if config:
            raise InputError("give a config or --table, not both")
        runs_dir = Path(args.runs_dir or ROOT / "runs" / Path(args.table).name).resolve()
        cells = sweep_cells(args.table, parse_seeds(args.seeds), args.methods.split(","), runs_dir, flags,
                            accelerate_config)
        if args.launcher != "local":
            submit_slurm(cells, runs_dir, args)
            return
        nproc = args.nproc or (1 if args.parallel > 1 else max(1, visible_gpus()))
        run_local(cells, runs_dir, args.parallel, nproc)
        return
    if args.launcher != "local" or args.parallel > 1:
        raise InputError("--launcher and --parallel apply to --table sweeps")
    nproc = args.nproc or max(1, visible_gpus())
    if config:
        single(Path(config).resolve(), flags, args.runs_dir, nproc, accelerate_config)
    elif flags or accelerate_config:
        refuse_demo_flags(flags or ["--accelerate_config"])
    else:
        demo(Path(args.runs_dir or ROOT / "runs/demo").resolve(), nproc)


if __name__ == "__main__":
    try:
        sys.exit(run_cli(main))
    except subprocess.CalledProcessError as error:
        sys.exit(error.returncode)
