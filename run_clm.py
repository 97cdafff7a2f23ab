#!/usr/bin/env python
"""Supervised fine-tuning of a causal LM with LoRPA, LoRA, AdaLoRA or full fine-tuning, scored by generation.

    python run_clm.py --config configs/clm/llama-3.2-3b/metamathqa.yaml --output_dir runs/metamath
    python run_clm.py --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name gsm8k --method lora --lora_r 32 \
        --lora_alpha 64 --lora_target_modules all-linear --max_steps 1000 --output_dir runs/gsm8k-lora

The loss counts response tokens only; every evaluation also generates answers greedily (adapters
merged) and scores the final number against the reference (GSM8K exact match). Any flag overrides
the `--config` YAML. See README.md for the flags LoRPA adds to the usual ones.
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: F401

# isort: split
import sys
from pathlib import Path

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, TrainingArguments, set_seed

from lorpa.cli import run_cli
from lorpa.errors import InputError
from lorpa.harness.adapters import check_target_modules
from lorpa.harness.arguments import TRAINING_DEFAULTS, MethodArguments, ModelArguments
from lorpa.harness.flags import parse_args
from lorpa.harness.loading import load_pretrained
from lorpa.harness.outputs import check_run_arguments, refuse_labelled_tolerance
from lorpa.harness.publish import publish
from lorpa.harness.results import results_record, run_config, write_results
from lorpa.harness.training import train_stages
from lorpa.tasks.clm.arguments import ClmModelArguments
from lorpa.tasks.clm.data import (
    ClmDataArguments,
    PaddingCollator,
    PromptFormatter,
    encode_split,
    generation_prompts,
    load_prompt_data,
    pad_id,
)
from lorpa.tasks.clm.evaluation import GenerationEvalTrainer
from lorpa.tasks.clm.gsm8k import gsm8k_metrics
from lorpa.tasks.clm.loading import load_causal_lm
from lorpa.tasks.summarization import write_summaries

ARGUMENTS = (ModelArguments, ClmDataArguments, ClmModelArguments, MethodArguments, TrainingArguments)

MAIN_METRIC = "accuracy"  # final-number exact match of the generated answers
PREDICTIONS_FILE = "generated_predictions.txt"


def check_length(config, args: ClmDataArguments) -> None:
    """Refuse lengths beyond the model's positions, which would fail mid-run."""
    limit = getattr(config, "max_position_embeddings", None)
    longest = args.max_seq_length + args.generation_max_new_tokens
    if limit is not None and longest > limit:
        raise InputError(f"--max_seq_length + --generation_max_new_tokens = {longest} exceeds the model's "
                         f"{limit} positions")


def main(argv=None):
    model_args, data_args, clm_args, method_args, training_args, config_path = parse_args(
        ARGUMENTS,
        argv,
        description=__doc__.splitlines()[0],
        # measured better than every real token (docs/method-study.md)
        defaults={**TRAINING_DEFAULTS, "calibration_tokens": "loss"},
    )
    check_run_arguments(training_args, method_args)
    refuse_labelled_tolerance(method_args)
    model_path, cache_dir = model_args.model_name_or_path, model_args.cache_dir
    config = load_pretrained(AutoConfig, model_path, cache_dir)  # fail on a bad model path before reading any data
    check_length(config, data_args)
    check_target_modules(config.model_type, method_args)
    tokenizer = load_pretrained(AutoTokenizer, model_args.tokenizer_name or model_path, cache_dir)
    formatter = PromptFormatter(tokenizer, data_args.prompt_template, data_args.use_chat_template)
    splits = load_prompt_data(data_args, cache_dir)
    train = encode_split(splits["train"], formatter, data_args, prompt_column=data_args.prompt_column,
                         response_column=data_args.response_column, source="training data",
                         drop_overlong=data_args.drop_overlong)
    # Evaluation rows that do not fit leave the loss only: every row is still generated and scored.
    evaluation = encode_split(splits["validation"], formatter, data_args, prompt_column=data_args.eval_prompt_column,
                              response_column=data_args.eval_response_column, source="evaluation data",
                              drop_overlong=True)
    data_summary = {
        "train_rows": len(train.features), "train_dropped_overlong": len(train.dropped),
        "train_truncated_prompts": train.truncated, "eval_rows": len(splits["validation"]),
        "eval_loss_rows": len(evaluation.features), "chat_template": formatter.chat,
    }
    print("data: " + ", ".join(f"{key} {value}" for key, value in data_summary.items()), flush=True)
    set_seed(training_args.seed)

    collator = PaddingCollator(pad_id(tokenizer),
                               pad_to_multiple_of=8 if training_args.fp16 or training_args.bf16 else None)
    prompts = generation_prompts(splits["validation"], formatter, data_args)
    references = list(splits["validation"][data_args.eval_response_column])

    def make_trainer(model, stage_args):
        return GenerationEvalTrainer(
            model=model,
            args=stage_args,
            train_dataset=train.features,
            eval_dataset=evaluation.features,
            processing_class=tokenizer,
            data_collator=collator,
            prompts=prompts,
            references=references,
            score=gsm8k_metrics,
            max_new_tokens=data_args.generation_max_new_tokens,
            pad_token_id=pad_id(tokenizer),
        )

    outcome = train_stages(
        load_model=lambda: load_causal_lm(model_path, cache_dir, clm_args, training_args),
        make_trainer=make_trainer,
        method_args=method_args,
        training_args=training_args,
        task_type="CAUSAL_LM",
        num_train_examples=len(train.features),
    )
    trainer, output_dir = outcome.trainer, training_args.output_dir
    if not trainer.predictions:  # the final evaluation ran before a resume of a finished run
        trainer.evaluate()
    if trainer.is_world_process_zero():
        write_summaries(Path(output_dir, PREDICTIONS_FILE), trainer.predictions)
        record = results_record(
            outcome,
            task=data_args.eval_task,
            model=model_path,
            method=method_args.method,
            seed=training_args.seed,
            main_metric=MAIN_METRIC,
            config=run_config(config_path, training_args, model_args, data_args, clm_args, method_args),
        )
        record["data"] = data_summary
        print(f"results: {write_results(output_dir, record)}")
    # merging into 4- or 8-bit weights would round the update away: a quantised base is loaded again, unquantised
    unquantised = (lambda: load_pretrained(AutoModelForCausalLM, model_path, cache_dir, dtype=clm_args.dtype)
                   ) if clm_args.quantized else None
    publish(outcome, method_args, training_args, "run_clm.py", tokenizer, unquantised)


if __name__ == "__main__":
    sys.exit(run_cli(main))
