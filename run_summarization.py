#!/usr/bin/env python
"""Fine-tune a sequence-to-sequence summarizer with LoRPA, LoRA, AdaLoRA or full fine-tuning.

    python run_summarization.py --config configs/summarization/bart-base/xsum.yaml --output_dir runs/xsum
    python run_summarization.py --model_name_or_path facebook/bart-base --dataset_name cnn_dailymail \
        --method lora --lora_r 16 --lora_alpha 32 --num_train_epochs 3 --output_dir runs/cnndm-lora

Every evaluation generates summaries (adapters merged into the weights) and scores them by ROUGE.
Any flag overrides the `--config` YAML. See README.md for the flags LoRPA adds to the usual ones.
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: F401

# isort: split
import sys
from pathlib import Path

from transformers import AutoConfig, AutoModelForSeq2SeqLM, AutoTokenizer, Seq2SeqTrainingArguments, set_seed

from lorpa.checkpoints import write_json_atomic
from lorpa.cli import run_cli
from lorpa.errors import InputError
from lorpa.harness.adapters import check_target_modules
from lorpa.harness.arguments import TRAINING_DEFAULTS, MethodArguments, ModelArguments
from lorpa.harness.flags import parse_args
from lorpa.harness.loading import load_model, load_pretrained
from lorpa.harness.outputs import check_run_arguments, refuse_labelled_tolerance
from lorpa.harness.publish import publish
from lorpa.harness.results import results_record, run_config, write_results
from lorpa.harness.training import train_stages
from lorpa.tasks.generation import MergedGenerationTrainer
from lorpa.tasks.summarization import (
    GeneratedRouge,
    SummarizationDataArguments,
    check_lengths,
    decode,
    load_summarization,
    summary_collator,
    tokenize_summaries,
    write_summaries,
)

ARGUMENTS = (ModelArguments, SummarizationDataArguments, MethodArguments, Seq2SeqTrainingArguments)

# rouge2 picks the best epoch: bigram overlap rewards fluent, on-content phrasing, while rouge1 also
# rewards scattered topic words and rougeL moves almost in step with rouge1.
MAIN_METRIC = "rouge2"
PREDICTIONS_FILE = "generated_predictions.txt"
TEST_PREDICTIONS_FILE = "test_generated_predictions.txt"
TEST_RESULTS_FILE = "test_results.json"


def write_test_predictions(trainer, dataset, tokenizer, output_dir: str) -> None:
    """Summarise the test split: its ROUGE to test_results.json, its summaries one per line."""
    output = trainer.predict(dataset)
    if trainer.is_world_process_zero():
        write_json_atomic(Path(output_dir, TEST_RESULTS_FILE), output.metrics)
        write_summaries(Path(output_dir, TEST_PREDICTIONS_FILE), decode(tokenizer, output.predictions))


def main(argv=None):
    model_args, data_args, method_args, training_args, config_path = parse_args(
        ARGUMENTS,
        argv,
        description=__doc__.splitlines()[0],
        defaults={**TRAINING_DEFAULTS, "predict_with_generate": True},
    )
    check_run_arguments(training_args, method_args)
    refuse_labelled_tolerance(method_args)
    if not training_args.predict_with_generate:
        raise InputError("ROUGE is scored on generated summaries: --predict_with_generate must stay true")
    training_args.generation_max_length = training_args.generation_max_length or data_args.val_max_target_length
    model_path, cache_dir = model_args.model_name_or_path, model_args.cache_dir
    config = load_pretrained(AutoConfig, model_path, cache_dir)  # fail on a bad model path before reading any data
    check_lengths(config, data_args, training_args.generation_max_length)
    check_target_modules(config.model_type, method_args)
    splits = load_summarization(data_args, cache_dir, with_test=training_args.do_predict)
    tokenizer = load_pretrained(AutoTokenizer, model_args.tokenizer_name or model_path, cache_dir)
    encoded = tokenize_summaries(splits, tokenizer, data_args)
    set_seed(training_args.seed)

    rouge = GeneratedRouge(tokenizer)
    collator = summary_collator(tokenizer, pad_to_multiple_of=8 if training_args.fp16 else None)

    def make_trainer(model, stage_args):
        return MergedGenerationTrainer(
            model=model,
            args=stage_args,
            train_dataset=encoded["train"],
            eval_dataset=encoded["validation"],
            processing_class=tokenizer,
            data_collator=collator,
            compute_metrics=rouge,
            generation_kwargs=data_args.generation_kwargs(),
        )

    outcome = train_stages(
        load_model=lambda: load_model(
            AutoModelForSeq2SeqLM, model_path, cache_dir, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
        ),
        make_trainer=make_trainer,
        method_args=method_args,
        training_args=training_args,
        task_type="SEQ_2_SEQ_LM",
        num_train_examples=len(encoded["train"]),
    )
    trainer, output_dir = outcome.trainer, training_args.output_dir
    if not rouge.predictions:  # the final evaluation ran before a resume of a finished run
        trainer.evaluate()
    if trainer.is_world_process_zero():
        write_summaries(Path(output_dir, PREDICTIONS_FILE), rouge.predictions)
    if "test" in encoded:
        write_test_predictions(trainer, encoded["test"], tokenizer, output_dir)
    if trainer.is_world_process_zero():
        record = results_record(
            outcome,
            task=data_args.task_name,
            model=model_path,
            method=method_args.method,
            seed=training_args.seed,
            main_metric=MAIN_METRIC,
            config=run_config(config_path, training_args, model_args, data_args, method_args),
        )
        print(f"results: {write_results(output_dir, record)}")
    publish(outcome, method_args, training_args, "run_summarization.py", tokenizer)


if __name__ == "__main__":
    sys.exit(run_cli(main))
