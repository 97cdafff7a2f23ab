"""Argument dataclasses shared by `run_glue.py` and `run_summarization.py`.

Flag names are a public interface: configs and `train.sh` depend on them.
"""

from __future__ import annotations

import json
import math
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..adapter_files import PEFT_DEFAULTS
from ..calibration import TOKENS, TOKENS_PER_RANK
from ..errors import InputError
from ..options import ALPHA_MODES, PruneOptions
from ..stages import PAPER_TARGET_RANK
from ..two_stage import StageOptions

METHODS = ("lorpa", "lora", "full", "adalora")
# Trainer settings the run scripts change: evaluate and log every epoch (the paper reports the best
# per-epoch validation score) and keep only the latest checkpoint.
# Pinned memory only helps copies to an accelerator; on a CPU-only machine torch warns about it every epoch.
TRAINING_DEFAULTS = {
    "eval_strategy": "epoch", "save_strategy": "epoch", "save_total_limit": 1, "logging_strategy": "epoch",
    "dataloader_pin_memory": torch.accelerator.is_available(),
}


@dataclass
class ModelArguments:
    _argument_group_name: ClassVar[str] = "model"
    model_name_or_path: str = field(metadata={"help": "Hub id or local folder of the pretrained model"})
    tokenizer_name: str | None = field(default=None, metadata={"help": "Tokenizer, if not the model's own"})
    cache_dir: str | None = field(default=None, metadata={"help": "Where to cache hub downloads"})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={"help": "Re-initialise checkpoint weights whose shape differs (e.g. another task's head)"},
    )


@dataclass
class MethodArguments:
    _argument_group_name: ClassVar[str] = "LoRPA: method, adapter and pruning"
    _help_first: ClassVar[bool] = True
    # One budget: a budget flag on the command line replaces the config's (`lorpa.harness.flags`).
    _one_of: ClassVar[tuple] = (("prune_target_rank", "prune_ratio", "prune_energy", "prune_tolerance",
                                 "prune_schedule"),)
    method: str = field(default="lorpa", metadata={"help": f"One of {', '.join(METHODS)}"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output folder"})
    merge_final: bool = field(
        default=False,
        metadata={"help": "Also write the final model with the adapter merged into the weights to OUTPUT_DIR/merged, "
                          "for serving engines without (per-module rank) adapter support; a quantised base "
                          "(run_clm.py) is merged into a copy loaded unquantised in --torch_dtype"},
    )
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (stage-1 rank r0 for lorpa, init_r for adalora)"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (stage 1 for lorpa)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt (names or name endings); left out: peft's default for the "
                          "architecture, e.g. query/value"},
    )
    modules_to_save: list[str] | None = field(
        default=None,
        metadata={"help": "Extra modules trained in full and saved with the adapter (the task head always is)"},
    )
    stage1_ratio: float = field(
        default=0.2,
        metadata={"help": "Fraction of the epochs trained at r0 before pruning; 1.0 prunes after the whole budget"},
    )
    stage2_epochs: float | None = field(
        default=None,
        metadata={"help": "Epochs of retraining after the (last) prune; default: the epochs left (none at "
                          "stage1_ratio 1.0)"},
    )
    stage2_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of retraining after the (last) prune, instead of --stage2_epochs "
                          "(a short recovery after a prune at the end)"},
    )
    stage1_adapter: str | None = field(
        default=None,
        metadata={
            "help": "A trained LoRA adapter folder taken as the end of stage 1 (e.g. a LoRA run at r0 with the same "
            "settings and seed): it is evaluated and pruned, and the later stages follow"
        },
    )
    prune_schedule: str | None = field(
        default=None,
        metadata={
            "help": "Iterative pruning, 'FRACTION:RANK,...' (e.g. 0.1:32,0.15:16,0.2:8: after 10%% of the epochs "
            "prune to 32, ...); each prune is followed by a fresh optimizer and schedule. Replaces "
            "--stage1_ratio and --prune_target_rank"
        },
    )
    prune_target_rank: int | None = field(default=None, metadata={
        "help": PruneOptions.help("target_rank") + f" ({PAPER_TARGET_RANK} when no budget flag is given)"})
    prune_ratio: float | None = field(default=None, metadata={"help": PruneOptions.help("ratio")})
    prune_energy: float | None = field(default=None, metadata={"help": PruneOptions.help("energy")})
    prune_tolerance: float | None = field(default=None, metadata={
        "help": PruneOptions.help("tolerance") + ". With --stage1_ratio 1.0; score: the main metric ×100 on the "
                "selection split (run_glue.py with --selection_split_percentage); agreement, kl: on the first "
                "--fidelity_rows training rows"})
    tolerance_metric: str | None = field(default=None, metadata={"help": PruneOptions.help("tolerance_metric")})
    prune_max_rank: int | None = field(default=None, metadata={"help": PruneOptions.help("max_rank")})
    prune_rank_multiple: int = field(default=1, metadata={"help": PruneOptions.help("rank_multiple")})
    prune_score: str | None = field(default=None, metadata={"help": PruneOptions.help("score")})
    prune_scope: str | None = field(default=None, metadata={"help": PruneOptions.help("scope")})
    pruned_alpha: str | None = field(default=None, metadata={
        "help": "lora_alpha after pruning: " + PruneOptions.help("alpha") + "; absent: keep_scaling"})
    rewind: str = field(default="none", metadata={"help": PruneOptions.help("rewind")})
    global_norm: str = field(default="absolute", metadata={"help": PruneOptions.help("global_norm")})
    calibration_batches: int | None = field(
        default=None,
        metadata={"help": "Training batches (in order, at the evaluation batch size) run through the model right "
                          "before each prune to record what the activation score needs; default: as many as hold "
                          f"{TOKENS_PER_RANK} tokens per unit of --lora_r. Given with another score, the prune report "
                          "also measures that score's output error"},
    )
    calibration_tokens: str = field(
        default="real",
        metadata={"help": f"Which positions the calibration counts: one of {', '.join(TOKENS)} (every unpadded token, "
                          "or for causal LMs only those the loss counts: run_clm.py's default)"},
    )
    svd_split: str = field(default="balanced", metadata={"help": PruneOptions.help("svd_split")})
    sensitivity_beta: float = field(
        default=0.85, metadata={"help": "With --prune_score sensitivity, the moving-average factor (AdaLoRA's 0.85)"}
    )
    min_rank: int = field(default=1, metadata={"help": PruneOptions.help("min_rank")})
    fidelity_rows: int = field(
        default=256, metadata={"help": "Training rows (in order) on which each prune's fidelity to the uncut adapter "
                                       "is measured: top-1 agreement and KL (lorpa.fidelity); 0 measures none"})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA's average target rank"})
    adalora_tinit_ratio: float = field(
        default=0.1, metadata={"help": "AdaLoRA warm-up before budgeting, as a fraction of steps"})
    adalora_tfinal_ratio: float = field(
        default=0.2, metadata={"help": "AdaLoRA final fine-tuning, as a fraction of steps"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise InputError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        for name, value in vars(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise InputError(f"--{name} must be a finite number, got {value}")
        budgets = [f"--{name}" for name in BUDGET_FLAGS if getattr(self, name) is not None]
        if len(budgets) > 1:
            raise InputError(f"give one of {', '.join(budgets)}, not several")
        if self.prune_tolerance is not None and (self.stage1_ratio != 1 or self.prune_schedule is not None):
            raise InputError("--prune_tolerance chooses the cut at the end of training: use it with "
                             "--stage1_ratio 1.0")
        if self.pruned_alpha is not None and self.pruned_alpha not in ALPHA_MODES:
            try:
                self.pruned_alpha = float(self.pruned_alpha)
            except ValueError:
                raise InputError(f"--pruned_alpha must be a positive number or fold, got "
                                 f"{self.pruned_alpha!r}") from None
            if not math.isfinite(self.pruned_alpha) or self.pruned_alpha <= 0:
                raise InputError(f"--pruned_alpha must be a positive number or fold, got {self.pruned_alpha:g}")
        if self.merge_final and self.method == "full":
            raise InputError("--merge_final merges an adapter; --method full already saves the whole model")
        if self.lora_r < 1:
            raise InputError(f"--lora_r must be a positive integer, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise InputError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise InputError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.stage1_adapter is not None:
            if self.method != "lorpa":
                raise InputError("--stage1_adapter is for --method lorpa")
            self.check_stage1_adapter()
            if self.rewind == "init" or self.prune_score == "sensitivity":
                raise InputError("--stage1_adapter cannot be used with --rewind init or --prune_score sensitivity: "
                                 "both need stage 1 to be trained here")
        if self.prune_schedule is not None and any(
                getattr(self, name) is not None for name in ("prune_target_rank", "prune_ratio", "prune_energy")):
            raise InputError("--prune_schedule sets the ranks; drop --prune_target_rank / --prune_ratio / "
                             "--prune_energy")
        stages = self.stage_options()
        options = self.prune_options(seed=0)
        self.prune_score, self.prune_scope = options.score, options.scope  # what runs, as results.json records it
        if self.prune_schedule is not None:
            stages.schedule(self.lora_r)  # validates
        elif self.method == "lorpa":
            given = any(getattr(self, flag) is not None for flag in BUDGET_FLAGS)
            target = self.prune_target_rank if given else PAPER_TARGET_RANK
            if target is not None and not 1 <= target <= self.lora_r:
                raise InputError(f"--prune_target_rank must be in [1, --lora_r={self.lora_r}], got {target}")
        if self.method == "adalora":
            if not 0 <= self.adalora_tinit_ratio + self.adalora_tfinal_ratio < 1:
                raise InputError("--adalora_tinit_ratio + --adalora_tfinal_ratio must be below 1")
            if not 0 < self.adalora_target_r < self.lora_r:
                raise InputError(f"--adalora_target_r must be in [1, --lora_r), got {self.adalora_target_r}")

    def check_stage1_adapter(self) -> None:
        """The adapter must be what stage 1 at --lora_r / --lora_alpha would have trained, so that results.json
        says what ran: an unpruned LoRA adapter of that rank and alpha."""
        where = f"--stage1_adapter {self.stage1_adapter}"
        path = Path(self.stage1_adapter, "adapter_config.json")
        if not path.is_file():
            raise InputError(f"{where}: no adapter_config.json there; give a saved peft adapter folder")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise InputError(f"{where}: adapter_config.json is not readable JSON ({error})") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            peft_type = config.get("peft_type") if isinstance(config, dict) else None
            raise InputError(f"{where}: not a LoRA adapter (peft_type {peft_type})")
        config = {**PEFT_DEFAULTS, **config}  # what peft reads where the file is silent
        ranks = sorted(set((config.get("rank_pattern") or {}).values()))
        if ranks:
            raise InputError(f"{where} was already pruned (ranks {', '.join(map(str, ranks))}); give the unpruned "
                             "LoRA adapter, or prune this one further with lorpa prune")
        if config.get("r") != self.lora_r or config.get("lora_alpha") != self.lora_alpha:
            raise InputError(f"{where} has rank {config.get('r')} and lora_alpha {config.get('lora_alpha')}, but "
                             f"--lora_r is {self.lora_r} and --lora_alpha {self.lora_alpha:g}: pass the adapter's "
                             "own values")

    def stage_options(self) -> StageOptions:
        """The stage flags as the library's `StageOptions`."""
        with flag_names():
            return StageOptions(**{name: getattr(self, name) for name in STAGE_FLAGS})

    def prune_options(self, seed: int) -> PruneOptions:
        """The prune flags as the library's `PruneOptions`: the default score for whether retraining follows the
        cut, and the paper's budget when the flags give none."""
        values = {option: getattr(self, flag) for option, flag in PRUNE_FLAGS.items()}
        values["alpha"] = "keep_scaling" if self.pruned_alpha is None else self.pruned_alpha
        with flag_names():
            options = PruneOptions(**values, seed=seed).for_cut(self.stage_options().retrains)
        return options if self.prune_schedule is not None else options.with_default_budget(PAPER_TARGET_RANK)

    @property
    def calibrates(self) -> bool:
        """Whether a calibration pass precedes each prune: the activation score needs one, and any score measures
        its output error with one."""
        return self.method == "lorpa" and (self.prune_score == "activation" or self.calibration_batches is not None)


# The library's option behind each flag whose name differs from it: errors name the flag the user typed.
PRUNE_FLAGS = {"target_rank": "prune_target_rank", "ratio": "prune_ratio", "energy": "prune_energy",
               "tolerance": "prune_tolerance", "tolerance_metric": "tolerance_metric", "max_rank": "prune_max_rank",
               "rank_multiple": "prune_rank_multiple",
               "score": "prune_score", "scope": "prune_scope", "alpha": "pruned_alpha", "min_rank": "min_rank",
               "rewind": "rewind", "svd_split": "svd_split", "global_norm": "global_norm"}
BUDGET_FLAGS = ("prune_target_rank", "prune_ratio", "prune_energy", "prune_tolerance")
STAGE_FLAGS = ("stage1_ratio", "prune_schedule", "stage2_epochs", "stage2_steps", "calibration_batches",
               "calibration_tokens", "sensitivity_beta", "fidelity_rows")


COMMON_WORDS = ("ratio", "energy", "tolerance", "score", "scope", "rewind", "alpha")  # named as flags only up front


@contextmanager
def flag_names():
    """The library names its options in its errors ("ratio must be ..."); here the user gave flags."""
    try:
        yield
    except InputError as error:
        message = str(error)
        for option, flag in {**PRUNE_FLAGS, **{n: n for n in STAGE_FLAGS}}.items():
            if option in COMMON_WORDS:
                message = re.sub(rf"^{option} must\b", f"--{flag} must", message)
                message = re.sub(rf"^unknown {option} '", f"unknown --{flag} '", message)
            else:
                message = re.sub(rf"(?<![-'\w]){option}\b", f"--{flag}", message)
        raise InputError(message) from None
