"""Argument dataclasses shared by `run_glue.py` and `run_summarization.py`.

Flag names are a public interface: configs and `train.sh` depend on them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch

from ..calibration import TOKENS, TOKENS_PER_RANK
from ..cli import UsageError
from ..lowrank import SVD_SPLITS
from ..pruning import REWINDS, SCOPES
from ..scoring import GLOBAL_NORMS, SCORES
from ..stages import PAPER_TARGET_RANK, parse_prune_schedule

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
        default=False, metadata={"help": "Re-initialise checkpoint weights whose shape differs (e.g. another task's head)"}
    )


@dataclass
class MethodArguments:
    _argument_group_name: ClassVar[str] = "LoRPA: method, adapter and pruning"
    _help_first: ClassVar[bool] = True
    method: str = field(default="lorpa", metadata={"help": f"One of {', '.join(METHODS)}"})
    overwrite_output_dir: bool = field(default=False, metadata={"help": "Replace a non-empty output folder"})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank (stage-1 rank r0 for lorpa, init_r for adalora)"})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA alpha (stage 1 for lorpa)"})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA branch's input"})
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={"help": "Modules to adapt (names or name endings); left out: peft's default for the architecture, e.g. query/value"}
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
        metadata={"help": "Epochs of retraining after the (last) prune; default: the epochs left (none at stage1_ratio 1.0)"},
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
    prune_target_rank: int | None = field(
        default=None, metadata={"help": f"Ranks kept per module ({PAPER_TARGET_RANK} when neither this nor --prune_ratio is given)"}
    )
    prune_ratio: float | None = field(default=None, metadata={"help": "Fraction of each module's ranks pruned"})
    prune_energy: float | None = field(
        default=None,
        metadata={"help": "With --prune_score svd or activation: the share of the components' energy kept, in (0, 1]: per "
                          "module in module scope (as peft's convert_to_lora with a float rank), one threshold over all "
                          "modules in global scope"},
    )
    prune_tolerance: float | None = field(
        default=None,
        metadata={"help": "Points (the main metric ×100) the pruned adapter may lose on the selection split: the smallest "
                          "global budget within them is kept, found by bisection, every candidate recorded (GLUE, with "
                          "--selection_split_percentage and --stage1_ratio 1.0)"},
    )
    prune_max_rank: int | None = field(
        default=None, metadata={"help": "No module keeps more components (a serving engine's --max-lora-rank)"}
    )
    prune_rank_multiple: int = field(default=1, metadata={"help": "Every kept rank is a multiple of this"})
    prune_score: str = field(default="magnitude", metadata={"help": f"One of {', '.join(SCORES)}"})
    prune_scope: str = field(default="module", metadata={"help": f"One of {', '.join(SCOPES)}"})
    pruned_alpha: str | None = field(
        default=None,
        metadata={"help": "lora_alpha after pruning: a number, or fold (each module's scaling multiplied into its B, "
                          "alpha = rank: scaling 1, which every serving engine applies alike); absent: keep each module's alpha/r"},
    )
    rewind: str = field(default="none", metadata={"help": f"One of {', '.join(REWINDS)}"})
    global_norm: str = field(
        default="absolute",
        metadata={"help": f"With --prune_score svd or activation and --prune_scope global, how components are ranked "
                          f"across modules: one of {', '.join(GLOBAL_NORMS)} (their own size, or their share of their module's)"},
    )
    calibration_batches: int | None = field(
        default=None,
        metadata={"help": "Training batches (in order, at the evaluation batch size) run through the model right before "
                          "each prune to record what the activation score needs; default: as many as hold "
                          f"{TOKENS_PER_RANK} tokens per unit of --lora_r. Given with another score, the prune report also "
                          "measures that score's output error"},
    )
    calibration_tokens: str = field(
        default="real",
        metadata={"help": f"Which positions the calibration counts: one of {', '.join(TOKENS)} (every unpadded token, "
                          "or for causal LMs only those the loss counts: run_clm.py's default)"},
    )
    svd_split: str = field(
        default="balanced",
        metadata={"help": f"With --prune_score svd, how S is shared by the new factors: one of {', '.join(SVD_SPLITS)}"},
    )
    sensitivity_beta: float = field(
        default=0.85, metadata={"help": "With --prune_score sensitivity, the moving-average factor (AdaLoRA's 0.85)"}
    )
    min_rank: int = field(default=1, metadata={"help": "No module is pruned below this rank (global scope)"})
    adalora_target_r: int = field(default=8, metadata={"help": "AdaLoRA's average target rank"})
    adalora_tinit_ratio: float = field(default=0.1, metadata={"help": "AdaLoRA warm-up before budgeting, as a fraction of steps"})
    adalora_tfinal_ratio: float = field(default=0.2, metadata={"help": "AdaLoRA final fine-tuning, as a fraction of steps"})

    def __post_init__(self):
        if self.method not in METHODS:
            raise UsageError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        amounts = [f"--{name}" for name in ("prune_target_rank", "prune_ratio", "prune_energy", "prune_tolerance")
                   if getattr(self, name) is not None]
        if len(amounts) > 1:
            raise UsageError(f"give one of {', '.join(amounts)}, not several")
        if self.prune_energy is not None and not 0 < self.prune_energy <= 1:
            raise UsageError(f"--prune_energy must be in (0, 1], got {self.prune_energy}")
        if self.prune_tolerance is not None and self.prune_tolerance < 0:
            raise UsageError(f"--prune_tolerance must be >= 0 points, got {self.prune_tolerance}")
        if self.prune_tolerance is not None and (self.stage1_ratio != 1 or self.prune_schedule is not None):
            raise UsageError("--prune_tolerance chooses the cut at the end of training: use it with --stage1_ratio 1.0")
        if self.pruned_alpha is not None and self.pruned_alpha not in ("fold", "keep_scaling"):
            try:
                self.pruned_alpha = float(self.pruned_alpha)
            except ValueError:
                raise UsageError(f"--pruned_alpha must be a positive number or fold, got {self.pruned_alpha!r}") from None
            if self.pruned_alpha <= 0:
                raise UsageError(f"--pruned_alpha must be a positive number or fold, got {self.pruned_alpha:g}")
        if self.prune_ratio is not None and not 0 <= self.prune_ratio < 1:
            raise UsageError(f"--prune_ratio must be in [0, 1), got {self.prune_ratio}")
        if self.method == "lorpa" and not 0 < self.stage1_ratio <= 1:
            raise UsageError(f"--stage1_ratio must be in (0, 1], got {self.stage1_ratio}")
        if self.stage2_epochs is not None and self.stage2_epochs < 0:
            raise UsageError(f"--stage2_epochs must be >= 0, got {self.stage2_epochs}")
        if self.stage2_steps is not None and self.stage2_steps < 0:
            raise UsageError(f"--stage2_steps must be >= 0, got {self.stage2_steps}")
        if self.stage2_steps is not None and self.stage2_epochs is not None:
            raise UsageError("give --stage2_epochs or --stage2_steps, not both")
        if self.global_norm not in GLOBAL_NORMS:
            raise UsageError(f"unknown --global_norm {self.global_norm!r}; choose one of {', '.join(GLOBAL_NORMS)}")
        if self.calibration_batches is not None and self.calibration_batches < 1:
            raise UsageError(f"--calibration_batches must be a positive integer, got {self.calibration_batches}")
        if self.calibration_tokens not in TOKENS:
            raise UsageError(f"unknown --calibration_tokens {self.calibration_tokens!r}; choose one of {', '.join(TOKENS)}")
        if self.lora_r < 1:
            raise UsageError(f"--lora_r must be a positive integer, got {self.lora_r}")
        if self.lora_alpha <= 0:
            raise UsageError(f"--lora_alpha must be positive, got {self.lora_alpha}")
        if not 0 <= self.lora_dropout < 1:
            raise UsageError(f"--lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if self.svd_split not in SVD_SPLITS:
            raise UsageError(f"unknown --svd_split {self.svd_split!r}; choose one of {', '.join(SVD_SPLITS)}")
        if not 0 <= self.sensitivity_beta < 1:
            raise UsageError(f"--sensitivity_beta must be in [0, 1), got {self.sensitivity_beta}")
        if self.stage1_adapter is not None:
            if self.method != "lorpa":
                raise UsageError("--stage1_adapter is for --method lorpa")
            self.check_stage1_adapter()
            if self.rewind == "init" or self.prune_score == "sensitivity":
                raise UsageError("--stage1_adapter cannot be used with --rewind init or --prune_score sensitivity: "
                                 "both need stage 1 to be trained here")
        if self.prune_schedule is not None:
            if self.prune_target_rank is not None or self.prune_ratio is not None or self.prune_energy is not None:
                raise UsageError("--prune_schedule sets the ranks; drop --prune_target_rank / --prune_ratio / --prune_energy")
            self.schedule()  # validates
        if (
            self.method == "lorpa"
            and self.prune_schedule is None
            and self.prune_kwargs(0)["target_rank"] not in (None, *range(1, self.lora_r + 1))
        ):
            raise UsageError(f"--prune_target_rank must be in [1, --lora_r={self.lora_r}], got {self.prune_target_rank}")
        if self.method == "adalora":
            if not 0 <= self.adalora_tinit_ratio + self.adalora_tfinal_ratio < 1:
                raise UsageError("--adalora_tinit_ratio + --adalora_tfinal_ratio must be below 1")
            if not 0 < self.adalora_target_r < self.lora_r:
                raise UsageError(f"--adalora_target_r must be in [1, --lora_r), got {self.adalora_target_r}")

    def check_stage1_adapter(self) -> None:
        """The adapter must be what stage 1 at --lora_r / --lora_alpha would have trained, so that results.json
        says what ran: an unpruned LoRA adapter of that rank and alpha."""
        where = f"--stage1_adapter {self.stage1_adapter}"
        path = Path(self.stage1_adapter, "adapter_config.json")
        if not path.is_file():
            raise UsageError(f"{where}: no adapter_config.json there; give a saved peft adapter folder")
        try:
            config = json.loads(path.read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise UsageError(f"{where}: adapter_config.json is not readable JSON ({error})") from None
        if not isinstance(config, dict) or config.get("peft_type") != "LORA":
            raise UsageError(f"{where}: not a LoRA adapter (peft_type {config.get('peft_type') if isinstance(config, dict) else None})")
        ranks = sorted(set((config.get("rank_pattern") or {}).values()))
        if ranks:
            raise UsageError(f"{where} was already pruned (ranks {', '.join(map(str, ranks))}); give the unpruned LoRA "
                             "adapter, or prune this one further with python -m lorpa.prune_adapter")
        if config.get("r") != self.lora_r or config.get("lora_alpha") != self.lora_alpha:
            raise UsageError(f"{where} has rank {config.get('r')} and lora_alpha {config.get('lora_alpha')}, but "
                             f"--lora_r is {self.lora_r} and --lora_alpha {self.lora_alpha:g}: pass the adapter's own values")

    def schedule(self) -> list[tuple[float, int | None]]:
        """(fraction of the epochs after which to prune, target rank) per prune; None: the prune flags decide."""
        if self.prune_schedule is None:
            return [(self.stage1_ratio, None)]
        return parse_prune_schedule(self.prune_schedule, self.lora_r)

    def prune_kwargs(self, seed: int) -> dict:
        """Keyword arguments for `lorpa.prune`."""
        target = self.prune_target_rank
        if target is None and self.prune_ratio is None and self.prune_energy is None and self.prune_tolerance is None:
            target = PAPER_TARGET_RANK
        return {
            "target_rank": target,
            "ratio": self.prune_ratio,
            "energy": self.prune_energy,
            "max_rank": self.prune_max_rank,
            "rank_multiple": self.prune_rank_multiple,
            "score": self.prune_score,
            "scope": self.prune_scope,
            "min_rank": self.min_rank,
            "alpha": "keep_scaling" if self.pruned_alpha is None else self.pruned_alpha,
            "rewind": self.rewind,
            "seed": seed,
            "svd_split": self.svd_split,
            "global_norm": self.global_norm,
        }

    @property
    def calibrates(self) -> bool:
        """Whether a calibration pass precedes each prune: the activation score needs one, and any score measures
        its output error with one."""
        return self.method == "lorpa" and (self.prune_score == "activation" or self.calibration_batches is not None)
