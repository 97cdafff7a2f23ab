"""The stages of a LoRPA run: how much of the budget each trains, which rank each prune leaves, and
where each prune's adapter and report are saved. The run scripts and `train_two_stage` share them,
so a run resumes the same way whichever started it."""

from __future__ import annotations

import dataclasses

from .errors import InputError

PAPER_TARGET_RANK = 8  # RoBERTa in the paper; used when neither prune flag is given
PRUNED_ADAPTER_DIR = "pruned_adapter"
PRUNE_REPORT_FILE = "prune_report.json"
RESULTS_FILE = "results.json"  # a run script's record of its run, beside its final adapter


@dataclasses.dataclass
class Stage:
    name: str
    epochs: float
    max_steps: int = -1  # >= 0: the stage's share of --max_steps, which overrides epochs
    prune_to: int | None = None  # target rank of the prune after this stage (None: the prune flags decide)
    prunes: bool = False  # whether a prune follows this stage
    given: bool = False  # trained before this run (a given stage-1 adapter): evaluated, not trained

    @property
    def trains(self) -> bool:
        return not self.given and (self.max_steps > 0 if self.max_steps >= 0 else self.epochs > 0)


def parse_prune_schedule(text: str, r0: int) -> list[tuple[float, int]]:
    """'0.1:32,0.15:16,0.2:8' -> [(0.1, 32), (0.15, 16), (0.2, 8)]: fractions rising within (0, 1],
    ranks falling from at most `r0` (the stage-1 rank) to at least 1."""
    steps = []
    for item in text.split(","):
        try:
            fraction, rank = item.split(":")
            steps.append((float(fraction), int(rank)))
        except ValueError:
            raise InputError(f"--prune_schedule: {item.strip()!r} is not FRACTION:RANK (e.g. "
                             "0.1:32,0.15:16,0.2:8)") from None
    fractions, ranks = [f for f, _ in steps], [r for _, r in steps]
    if not all(a < b for a, b in zip([0.0] + fractions, fractions)) or fractions[-1] > 1:
        raise InputError(f"--prune_schedule fractions must increase within (0, 1], got {fractions}")
    if not all(a > b for a, b in zip([r0 + 1] + ranks, ranks)) or ranks[-1] < 1:
        raise InputError(f"--prune_schedule ranks must decrease from at most --lora_r={r0} to >= 1, got {ranks}")
    return steps


def lorpa_stages(schedule: list[tuple[float, int | None]], num_train_epochs: float, max_steps: int = -1,
                 stage2_epochs: float | None = None, stage2_steps: int | None = None) -> list[Stage]:
    """A stage per (fraction, target rank) of `schedule`, each followed by its prune, then the final stage
    (the rest of the budget, or `stage2_epochs`, or `stage2_steps` optimizer steps). With `max_steps` > 0
    steps are shared out, not epochs."""

    def steps_until(fraction: float) -> int:
        return round(max_steps * fraction) if max_steps > 0 else 0

    stages, done = [], 0.0
    for index, (fraction, rank) in enumerate(schedule, start=1):
        steps = steps_until(fraction) - steps_until(done) if max_steps > 0 else -1
        stages.append(Stage(f"stage{index}", num_train_epochs * (fraction - done), steps, rank, prunes=True))
        done = fraction
    final_steps = max_steps - steps_until(done) if max_steps > 0 and stage2_epochs is None else -1
    final_epochs = num_train_epochs * (1 - done) if stage2_epochs is None else stage2_epochs
    if stage2_steps is not None:
        final_epochs, final_steps = 0.0, stage2_steps
    return stages + [Stage(f"stage{len(stages) + 1}", final_epochs, final_steps)]


def prune_files(stages: list[Stage], index: int) -> tuple[str, str]:
    """(adapter folder, report file) of the prune after stage `index`: the last prune's keep the
    two-stage names, earlier ones are numbered by the stage they follow."""
    last = max(i for i, stage in enumerate(stages) if stage.prunes)
    if index == last:
        return PRUNED_ADAPTER_DIR, PRUNE_REPORT_FILE
    return f"{PRUNED_ADAPTER_DIR}_{index + 1}", f"prune_report_{index + 1}.json"
