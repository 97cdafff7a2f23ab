"""A run's final adapter, as users receive it: a model card that says what the run and its prune did, and the
upload that `--push_to_hub` asks for (the final pruned adapter and its card, never a stage's checkpoint)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from peft import PeftModel

from ..adapter_files import CARD_FILE
from ..card import model_card
from ..check_adapter import check_adapter
from ..hub import push_folder
from ..layers import lora_layers, unwrap
from .arguments import MethodArguments

MERGED_DIR = "merged"
# What stays on disk only: the stages' checkpoints, the adapters before each retraining, a merged copy.
NOT_PUSHED = ["stage*/**", "pruned_adapter*/**", f"{MERGED_DIR}/**", "training_args.bin"]


def write_card(outcome, method_args: MethodArguments, training_args, script: str) -> None:
    """The card of a LoRPA run's final adapter (process 0); other methods keep peft's."""
    if outcome.prune_report is None or not outcome.trainer.is_world_process_zero():
        return
    output = Path(training_args.output_dir)
    config = json.loads((output / "adapter_config.json").read_text())
    shapes = {name: (layer.in_features, layer.out_features) for name, layer in lora_layers(outcome.model).items()}
    stages = method_args.stage_options()
    when = ("at the end of its training, and left as cut" if not stages.retrains
            else "during its training and retrained")
    origin = f"trained with LoRPA's `{script}`: LoRA at rank {method_args.lora_r}, pruned {when}"
    card = model_card(outcome.prune_report, config, method_args.prune_options(training_args.seed), shapes,
                      check_adapter(output)[1]["engines"], origin)
    (output / CARD_FILE).write_text(card)


def push_result(outcome, training_args) -> str | None:
    """With --push_to_hub, upload the final adapter folder (process 0): the repo is --hub_model_id, else the output
    folder's name; returns the commit's URL."""
    if not training_args.push_to_hub or not outcome.trainer.is_world_process_zero():
        return None
    output = Path(training_args.output_dir)
    report = outcome.prune_report
    ranks = "" if report is None else f", total rank {sum(report.old_ranks.values())} -> {sum(report.ranks.values())}"
    return push_folder(output, training_args.hub_model_id or output.name, private=bool(training_args.hub_private_repo),
                       revision=training_args.hub_revision, message=f"Final adapter of {output.name}{ranks}",
                       ignore=NOT_PUSHED)


def save_merged(model, folder: str | Path, tokenizer=None) -> Path:
    """Merge the adapter into the base weights (peft's `merge_and_unload`) and save a plain transformers model.

    Changes `model` in place: call it after training. The folder loads with `from_pretrained` alone.
    """
    model = unwrap(model)
    merged = model.merge_and_unload() if isinstance(model, PeftModel) else model
    merged.save_pretrained(folder)
    if tokenizer is not None:
        tokenizer.save_pretrained(folder)
    return Path(folder)


def publish(outcome, method_args: MethodArguments, training_args, script: str, tokenizer=None,
            unquantised_base: Callable[[], torch.nn.Module] | None = None) -> None:
    """After results.json: the card, the merged copy that --merge_final asks for (into `unquantised_base()` when
    the run's base was quantised), then the upload that --push_to_hub asks for (a failed upload leaves the finished
    run on disk and says so in one line)."""
    write_card(outcome, method_args, training_args, script)
    if method_args.merge_final and outcome.trainer.is_world_process_zero():
        output = Path(training_args.output_dir)
        model = outcome.model if unquantised_base is None else PeftModel.from_pretrained(unquantised_base(), output)
        note = "" if unquantised_base is None else (" (the adapter merged into a copy of the base loaded unquantised; "
                                                    "the quantised weights were not merged into)")
        print(f"merged model: {save_merged(model, output / MERGED_DIR, tokenizer)}{note}")
    pushed = push_result(outcome, training_args)
    if pushed is not None:
        print(f"pushed: {pushed}")
