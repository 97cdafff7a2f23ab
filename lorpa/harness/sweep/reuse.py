"""A prune-at-the-end LoRPA cell takes its stage 1 from the LoRA cell of the same sweep that trains it.

With `stage1_ratio: 1.0` stage 1 is the whole budget at r0, which is exactly what the LoRA row at r0
trains when the two configs agree on everything but the prune (and the seed is the same): the
cell then starts from that run's adapter (`--stage1_adapter`) instead of training it again, with
identical results. A cell whose LoRA twin has not finished, or failed, trains stage 1 itself.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

from ..arguments import PRUNE_FLAGS, STAGE_FLAGS, MethodArguments
from .cells import Cell

# Flags that only decide what happens after stage 1, or whether it is trained here.
AFTER_STAGE1_KEYS = frozenset({"method", "stage1_adapter", "merge_final", *PRUNE_FLAGS.values(), *STAGE_FLAGS})
METHOD_DEFAULTS = {field.name: field.default for field in dataclasses.fields(MethodArguments)}


def trains_a_lora_stage1(values: dict) -> bool:
    """Whether a config's stage 1 is a plain LoRA run: the whole budget at r0, with nothing recorded
    during it for the prune (the init snapshot of rewind=init, the tracked sensitivity)."""
    values = {**METHOD_DEFAULTS, **values}
    return (values["method"] == "lorpa" and values["stage1_ratio"] == 1 and values["prune_schedule"] is None
            and values["stage1_adapter"] is None and values["rewind"] != "init"
            and values["prune_score"] != "sensitivity")


def link_stage1_runs(cells: list[Cell], values_of: Callable[[Path], dict]) -> None:
    """Set `stage1_from` of every cell whose stage 1 a LoRA cell of the sweep trains: same config apart
    from the keys above, same flags (the seed included)."""

    def shared(cell: Cell) -> str:
        values = {key: value for key, value in values_of(cell.config).items() if key not in AFTER_STAGE1_KEYS}
        return json.dumps([values, cell.flags], sort_keys=True, default=str)

    lora_runs = {shared(cell): cell for cell in cells if values_of(cell.config).get("method") == "lora"}
    for cell in cells:
        if trains_a_lora_stage1(values_of(cell.config)):
            twin = lora_runs.get(shared(cell))
            if twin is not None:
                cell.stage1_from = twin.output_dir
