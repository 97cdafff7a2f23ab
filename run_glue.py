#!/usr/bin/env python
"""Fine-tune a sequence classifier on a GLUE task with LoRPA, LoRA, AdaLoRA or full fine-tuning.

    python run_glue.py --config configs/glue/roberta-base/rte.yaml --output_dir runs/rte
    python run_glue.py --model_name_or_path roberta-base --task_name mrpc --method lora --lora_r 8 \
        --num_train_epochs 3 --output_dir runs/mrpc-lora

Any flag overrides the `--config` YAML. See README.md for the flags LoRPA adds to the usual ones.
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: F401

# isort: split
import sys
from pathlib import Path

import numpy as np
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
    default_data_collator,
    set_seed,
)

from lorpa.cli import run_cli
from lorpa.errors import InputError
from lorpa.harness.arguments import TRAINING_DEFAULTS, MethodArguments, ModelArguments
from lorpa.harness.flags import parse_args
from lorpa.harness.loading import load_model, load_pretrained
from lorpa.harness.outputs import check_run_arguments
from lorpa.harness.publish import publish
from lorpa.harness.results import results_record, run_config, write_results
from lorpa.harness.training import train_stages
from lorpa.tasks.glue import (
    SELECTION_SPLIT,
    GlueDataArguments,
    carve_selection_split,
    compute_metrics_for,
    load_glue,
    main_metric_name,
    tokenize_glue,
    warn_if_too_coarse,
    without_split_prefix,
)

ARGUMENTS = (ModelArguments, GlueDataArguments, MethodArguments, TrainingArguments)


def write_predictions(trainer: Trainer, dataset, task, output_dir: str) -> None:
    """GLUE-submission style `predict_results.txt`: index and predicted label (or score)."""
    predictions = trainer.predict(dataset.remove_columns([c for c in ("label",) if c in dataset.column_names]))
    values = predictions.predictions
    values = values.reshape(-1) if task.is_regression else np.argmax(values, axis=-1)
    if trainer.is_world_process_zero():
        lines = ["index\tprediction"] + [f"{i}\t{v:.3f}" if task.is_regression else f"{i}\t{v}"
                                         for i, v in enumerate(values)]
        Path(output_dir, "predict_results.txt").write_text("\n".join(lines) + "\n")


def selection_points(trainer: Trainer, dataset, task) -> float:
    """The main metric ×100 on the selection split: what --prune_tolerance compares candidates by."""
    metrics = trainer.evaluate(eval_dataset=dataset, metric_key_prefix=SELECTION_SPLIT)
    return 100 * metrics[f"{SELECTION_SPLIT}_{task.main_metric}"]


def main(argv=None):
    model_args, data_args, method_args, training_args, config_path = parse_args(
        ARGUMENTS,
        argv,
        description=__doc__.splitlines()[0],
        defaults=TRAINING_DEFAULTS,
    )
    check_run_arguments(training_args, method_args)
    if method_args.tolerance_metric == "score" and not data_args.selection_split_percentage:
        raise InputError("--prune_tolerance chooses the budget on held-out rows: add --selection_split_percentage P, "
                         "so the validation set is never used to choose (or use a label-free --tolerance_metric)")
    task = data_args.task
    model_path, cache_dir = model_args.model_name_or_path, model_args.cache_dir
    load_pretrained(AutoConfig, model_path, cache_dir)  # fail on a bad model path before reading any data
    splits = load_glue(data_args, cache_dir)
    if data_args.selection_split_percentage:
        splits = carve_selection_split(splits, data_args.selection_split_percentage, training_args.seed)
        if method_args.tolerance_metric in (None, "score"):
            warn_if_too_coarse(len(splits[SELECTION_SPLIT]), task, method_args.prune_tolerance)
    tokenizer = load_pretrained(AutoTokenizer, model_args.tokenizer_name or model_path, cache_dir)
    encoded = tokenize_glue(splits, tokenizer, data_args)
    set_seed(training_args.seed)

    eval_splits = {split: encoded[split] for split in task.eval_splits}
    selection = SELECTION_SPLIT in encoded
    if selection:  # evaluated every epoch beside the validation set(s), which stay the reported numbers
        eval_splits = {SELECTION_SPLIT: encoded[SELECTION_SPLIT], **eval_splits}
    collator = default_data_collator if data_args.pad_to_max_length else DataCollatorWithPadding(tokenizer)

    def make_trainer(model, stage_args):
        return Trainer(
            model=model,
            args=stage_args,
            train_dataset=encoded["train"],
            eval_dataset=eval_splits if len(eval_splits) > 1 else eval_splits[task.eval_splits[0]],
            processing_class=tokenizer,
            data_collator=collator,
            compute_metrics=compute_metrics_for(task),
        )

    outcome = train_stages(
        load_model=lambda: load_model(
            AutoModelForSequenceClassification,
            model_path,
            cache_dir,
            num_labels=task.num_labels,
            ignore_mismatched_sizes=model_args.ignore_mismatched_sizes,
        ),
        make_trainer=make_trainer,
        method_args=method_args,
        training_args=training_args,
        task_type="SEQ_CLS",
        num_train_examples=len(encoded["train"]),
        selection_score=(
            (lambda trainer: selection_points(trainer, encoded[SELECTION_SPLIT], task)) if selection else None
        ),
    )
    if "test" in encoded:
        write_predictions(outcome.trainer, encoded["test"], task, training_args.output_dir)
    if selection and len(task.eval_splits) == 1:
        for stage in outcome.stages:
            stage["history"] = without_split_prefix(stage["history"], task.eval_splits[0])
    if outcome.trainer.is_world_process_zero():
        record = results_record(
            outcome,
            task=task.name,
            model=model_args.model_name_or_path,
            method=method_args.method,
            seed=training_args.seed,
            main_metric=main_metric_name(task),
            selection_metric=f"{SELECTION_SPLIT}_{task.main_metric}" if selection else None,
            config=run_config(config_path, training_args, model_args, data_args, method_args),
        )
        print(f"results: {write_results(training_args.output_dir, record)}")
    publish(outcome, method_args, training_args, "run_glue.py", tokenizer)


if __name__ == "__main__":
    sys.exit(run_cli(main))
