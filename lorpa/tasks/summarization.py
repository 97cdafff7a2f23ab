"""Summarization data (CNN/DailyMail, XSum or local files): checked, tokenised, cached, and scored by ROUGE.

ROUGE is computed on generated summaries only. Labels are padded with -100 by the collator, never
with the pad id, so padding is neither trained on nor scored.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import numpy as np
from datasets import DatasetDict, load_dataset
from transformers import DataCollatorForSeq2Seq

from ..errors import InputError
from .data_files import read_data_file, require_columns
from .metrics import rouge_metrics

LABEL_PAD_ID = -100  # ignored by the loss; replaced by the pad id before decoding


@dataclass(frozen=True)
class HubSummarizationDataset:
    path: str
    config: str | None
    text_column: str
    summary_column: str
    revision: str | None = None


HUB_DATASETS = {
    "cnn_dailymail": HubSummarizationDataset("abisee/cnn_dailymail", "3.0.0", "article", "highlights"),
    # The main branch holds a loading script, which datasets >= 4 no longer runs; the hub's Parquet export does.
    "xsum": HubSummarizationDataset("EdinburghNLP/xsum", None, "document", "summary", "refs/convert/parquet"),
}


@dataclass
class SummarizationDataArguments:
    _argument_group_name: ClassVar[str] = "data (summarization)"
    dataset_name: str | None = field(
        default=None, metadata={"help": f"One of {', '.join(HUB_DATASETS)}; leave out for local files"}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config (cnn_dailymail: 3.0.0)"})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of local copies of --dataset_name in the hub's schema, read instead of the hub: "
            "DATA_DIR/<dataset_name>/train.jsonl and validation.jsonl (test.jsonl with --do_predict)"
        },
    )
    train_file: str | None = field(default=None, metadata={"help": "Local CSV or JSON Lines file instead of the hub"})
    validation_file: str | None = field(default=None, metadata={"help": "Local validation file, scored every epoch"})
    test_file: str | None = field(
        default=None,
        metadata={"help": "Local file summarised and scored after training (hub data: --do_predict, its test split)"},
    )
    text_column: str | None = field(
        default=None, metadata={"help": "Article column (default: the dataset's, else 'document')"}
    )
    summary_column: str | None = field(
        default=None, metadata={"help": "Summary column (default: the dataset's, else 'summary')"}
    )
    max_source_length: int = field(default=1024, metadata={"help": "Articles are truncated to this many tokens"})
    max_target_length: int = field(
        default=128, metadata={"help": "Training summaries are truncated to this many tokens"}
    )
    val_max_target_length: int | None = field(
        default=None,
        metadata={"help": "Evaluation summaries are truncated to this many tokens; also the default "
                          "--generation_max_length (default: --max_target_length)"},
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N validation rows"})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use only the first N test rows"})
    source_prefix: str = field(default="", metadata={"help": "Text put before every article (T5: 'summarize: ')"})
    length_penalty: float | None = field(
        default=None, metadata={"help": "Beam-search length penalty (default: the model's)"}
    )
    no_repeat_ngram_size: int | None = field(
        default=None, metadata={"help": "No n-gram of this size is generated twice (default: the model's)"}
    )
    preprocessing_num_workers: int | None = field(default=None, metadata={"help": "Processes for tokenising"})
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenise instead of using the cache"})

    def __post_init__(self):
        if self.dataset_name is not None and self.dataset_name not in HUB_DATASETS:
            raise InputError(f"unknown dataset {self.dataset_name!r}; choose one of {', '.join(HUB_DATASETS)}")
        local = (self.train_file, self.validation_file)
        if self.dataset_name is not None and any((*local, self.test_file)):
            raise InputError("give --dataset_name or local files (--train_file, --validation_file), not both")
        if self.dataset_name is None and not all(local):
            raise InputError("give --dataset_name, or both --train_file and --validation_file")
        if self.data_dir is not None:
            if self.dataset_name is None:
                raise InputError("--data_dir needs --dataset_name: it reads DATA_DIR/<dataset_name>/train.jsonl etc.")
            if not self.local_folder.is_dir():
                raise InputError(f"--data_dir {self.data_dir}: no folder {self.local_folder} "
                                 "(expected <dataset_name>/train.jsonl and validation.jsonl)")
        if self.val_max_target_length is None:
            self.val_max_target_length = self.max_target_length
        for flag in ("max_source_length", "max_target_length", "val_max_target_length"):
            if getattr(self, flag) < 1:
                raise InputError(f"--{flag} must be positive, got {getattr(self, flag)}")
        hub = HUB_DATASETS.get(self.dataset_name)
        if self.dataset_config_name is None and hub is not None:
            self.dataset_config_name = hub.config
        if self.text_column is None:
            self.text_column = hub.text_column if hub else "document"
        if self.summary_column is None:
            self.summary_column = hub.summary_column if hub else "summary"

    @property
    def local_folder(self) -> Path:
        return Path(self.data_dir, self.dataset_name)

    @property
    def task_name(self) -> str:
        """What results.json calls the task."""
        return self.dataset_name or "local"

    def generation_kwargs(self) -> dict:
        """The generation options given on the command line; the model's own apply to the rest."""
        options = {"length_penalty": self.length_penalty, "no_repeat_ngram_size": self.no_repeat_ngram_size}
        return {name: value for name, value in options.items() if value is not None}


def check_lengths(config, args: SummarizationDataArguments, generation_max_length: int) -> None:
    """Refuse lengths beyond the model's position embeddings, which would fail mid-run with an index error."""
    encoder = getattr(config, "encoder", config)  # EncoderDecoderConfig keeps each side's config
    decoder = getattr(config, "decoder", config)
    lengths = {
        "--max_source_length": (args.max_source_length, encoder),
        "--max_target_length": (args.max_target_length, decoder),
        "--val_max_target_length": (args.val_max_target_length, decoder),
        "--generation_max_length": (generation_max_length, decoder),
    }
    for flag, (length, side) in lengths.items():
        limit = getattr(side, "max_position_embeddings", None)
        if limit is not None and length > limit:
            raise InputError(f"{flag} {length} exceeds the model's {limit} positions")


def load_summarization(
    args: SummarizationDataArguments, cache_dir: str | None = None, with_test: bool = False
) -> DatasetDict:
    """Train, validation and test splits (local `--test_file`, or the hub's test split if `with_test`), checked."""
    if args.data_dir is not None:
        names = ("train", "validation", "test") if with_test else ("train", "validation")
        files = {split: str(args.local_folder / f"{split}.jsonl") for split in names}
        flags = dict.fromkeys(names, f"--data_dir {args.data_dir}")
        splits = DatasetDict({split: read_data_file(files[split], cache_dir, flags[split]) for split in names})
    elif args.dataset_name is None:
        if with_test and not args.test_file:
            raise InputError("--do_predict with local data needs --test_file")
        files = {"train": args.train_file, "validation": args.validation_file}
        if args.test_file:
            files["test"] = args.test_file
        splits = DatasetDict({split: read_data_file(path, cache_dir, f"--{split}_file")
                              for split, path in files.items()})
    else:
        hub = HUB_DATASETS[args.dataset_name]
        names = ("train", "validation", "test") if with_test else ("train", "validation")
        files = {split: f"{hub.path} ({split})" for split in names}
        try:
            loaded = load_dataset(hub.path, args.dataset_config_name, revision=hub.revision, cache_dir=cache_dir)
        except Exception as error:  # offline, unknown config, hub errors: several exception types
            raise InputError(f"could not load dataset {hub.path}: {str(error).strip().splitlines()[0]}") from error
        splits = DatasetDict({split: loaded[split] for split in names})
    for split, dataset in splits.items():
        require_columns(dataset, (args.text_column, args.summary_column), files[split])
    limits = {"train": args.max_train_samples, "validation": args.max_eval_samples, "test": args.max_predict_samples}
    for split, dataset in splits.items():
        if limits[split] is not None:
            splits[split] = dataset.select(range(min(limits[split], len(dataset))))
    return splits


def tokenize_summaries(splits: DatasetDict, tokenizer, args: SummarizationDataArguments) -> DatasetDict:
    """Articles to `input_ids`, summaries to unpadded `labels` (cached by `datasets`); the collator pads."""

    target_lengths = {"train": args.max_target_length}

    def encode(batch, max_target_length):
        articles = [args.source_prefix + text for text in batch[args.text_column]]
        encoded = tokenizer(articles, max_length=args.max_source_length, truncation=True)
        targets = tokenizer(text_target=batch[args.summary_column], max_length=max_target_length, truncation=True)
        encoded["labels"] = targets["input_ids"]
        return encoded

    return DatasetDict(
        {
            split: dataset.map(
                encode,
                batched=True,
                fn_kwargs={"max_target_length": target_lengths.get(split, args.val_max_target_length)},
                num_proc=args.preprocessing_num_workers,
                remove_columns=dataset.column_names,
                load_from_cache_file=not args.overwrite_cache,
                desc=f"Tokenizing {split}",
            )
            for split, dataset in splits.items()
        }
    )


def summary_collator(tokenizer, pad_to_multiple_of: int | None = None) -> DataCollatorForSeq2Seq:
    """Pads inputs with the pad id and labels with -100; the model shifts labels into decoder inputs itself."""
    return DataCollatorForSeq2Seq(tokenizer, label_pad_token_id=LABEL_PAD_ID, pad_to_multiple_of=pad_to_multiple_of)


def decode(tokenizer, token_ids) -> list[str]:
    """Texts of generated ids or labels, without -100 (label padding, and the Trainer's padding across batches)."""
    token_ids = np.where(np.asarray(token_ids) == LABEL_PAD_ID, tokenizer.pad_token_id, token_ids)
    return [text.strip() for text in tokenizer.batch_decode(token_ids, skip_special_tokens=True)]


class GeneratedRouge:
    """Trainer `compute_metrics` for `predict_with_generate`: ROUGE of the generated summaries.

    The texts of the latest evaluation are kept in `predictions`, so the final one can be written
    out without generating everything again.
    """

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.predictions: list[str] = []

    def __call__(self, eval_prediction) -> dict[str, float]:
        generated = np.asarray(eval_prediction.predictions)
        if generated.ndim != 2 or not np.issubdtype(generated.dtype, np.integer):
            raise ValueError("ROUGE needs generated token ids; evaluate with predict_with_generate=True")
        self.predictions = decode(self.tokenizer, generated)
        return rouge_metrics(self.predictions, decode(self.tokenizer, eval_prediction.label_ids))


def write_summaries(path: str | Path, summaries: list[str]) -> Path:
    """One summary per line (line breaks inside a summary become spaces), in dataset order."""
    path = Path(path)
    path.write_text("".join(" ".join(summary.splitlines()) + "\n" for summary in summaries))
    return path
