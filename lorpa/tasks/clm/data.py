"""Prompt/response data for supervised fine-tuning of causal LMs: hub or local, formatted, tokenised.

Each row becomes a prompt (the `--prompt_template` around the prompt column, or the tokenizer's
chat template as a user turn) followed by the response and an end-of-sequence token. The loss
counts response tokens only: prompt positions get label -100. Rows longer than `--max_seq_length`
lose prompt tokens from the left (a leading BOS stays); a row whose response cannot fit with at
least one prompt token is never cut silently: it is dropped and counted, or refused with
`--drop_overlong false`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset, load_dataset

from ...errors import InputError
from ..data_files import read_data_file, require_columns

IGNORE_INDEX = -100  # label of prompt and padding positions, skipped by the loss
PROMPT_FIELD = "{prompt}"


@dataclass(frozen=True)
class KnownDataset:
    path: str
    config: str | None
    prompt_column: str
    response_column: str
    eval_split: str | None  # None: no held-out split (train on it, evaluate on another dataset)


KNOWN_DATASETS = {
    "gsm8k": KnownDataset("openai/gsm8k", "main", "question", "answer", "test"),
    "openai/gsm8k": KnownDataset("openai/gsm8k", "main", "question", "answer", "test"),
    "meta-math/MetaMathQA": KnownDataset("meta-math/MetaMathQA", None, "query", "response", None),
}
GSM8K_PATH = "openai/gsm8k"


@dataclass
class ClmDataArguments:
    dataset_name: str | None = field(
        default=None,
        metadata={"help": f"Hub dataset to train on (known columns: {', '.join(KNOWN_DATASETS)}); "
                          "leave out for local files"},
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config (gsm8k: main)"})
    eval_dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset to evaluate on (default: --dataset_name)"}
    )
    eval_dataset_config_name: str | None = field(default=None, metadata={"help": "Its config"})
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None, metadata={"help": "Split evaluated (default: gsm8k's test, else validation)"}
    )
    data_dir: str | None = field(
        default=None,
        metadata={"help": "Folder of local GSM8K copies in the hub's schema, read wherever GSM8K would come from "
                          "the hub: DATA_DIR/gsm8k/train.jsonl and test.jsonl"},
    )
    train_file: str | None = field(default=None, metadata={"help": "Local JSON Lines (or CSV) training file"})
    validation_file: str | None = field(default=None, metadata={"help": "Local evaluation file"})
    prompt_column: str | None = field(
        default=None, metadata={"help": "Prompt column of the training data (default: the dataset's, else 'prompt')"}
    )
    response_column: str | None = field(
        default=None,
        metadata={"help": "Response column of the training data (default: the dataset's, else 'response')"},
    )
    eval_prompt_column: str | None = field(
        default=None,
        metadata={"help": "Prompt column of the evaluation data (default: its dataset's, else --prompt_column)"},
    )
    eval_response_column: str | None = field(
        default=None,
        metadata={"help": "Reference column of the evaluation data (default: its dataset's, else --response_column)"},
    )
    prompt_template: str | None = field(
        default=None,
        metadata={"help": "Text around each prompt, with {prompt} where it goes, "
                          "e.g. 'Question: {prompt}\\nAnswer:'"},
    )
    use_chat_template: bool = field(
        default=True,
        metadata={"help": "Format prompts as a user turn of the tokenizer's chat template, if it has one"},
    )
    max_seq_length: int = field(
        default=1024, metadata={"help": "Prompt + response tokens; prompts are cut from the left"}
    )
    drop_overlong: bool = field(
        default=True,
        metadata={"help": "Drop (and count) rows whose response does not fit in --max_seq_length; false: refuse them"},
    )
    generation_max_new_tokens: int = field(default=256, metadata={"help": "Tokens generated per evaluation prompt"})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training rows"})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation rows"})
    preprocessing_num_workers: int | None = field(default=None)
    overwrite_cache: bool = field(default=False, metadata={"help": "Re-tokenise instead of using the cache"})

    def __post_init__(self):
        if self.dataset_name is not None and self.train_file:
            raise InputError("give --dataset_name or --train_file, not both")
        if self.eval_dataset_name is not None and self.validation_file:
            raise InputError("give --eval_dataset_name or --validation_file, not both")
        if self.eval_dataset_name is None and self.validation_file is None and not self.train_file:
            self.eval_dataset_name = self.dataset_name  # evaluate on the training dataset's held-out split
            self.eval_dataset_config_name = self.eval_dataset_config_name or self.dataset_config_name
        self.eval_task = self.eval_dataset_name.split("/")[-1] if self.eval_dataset_name else "local"
        if self.data_dir is not None:
            self._use_data_dir()
        if not (self.dataset_name or self.train_file):
            raise InputError("give --dataset_name, --train_file or --data_dir for the training data")
        if not (self.eval_dataset_name or self.validation_file):
            raise InputError("give --validation_file or --eval_dataset_name for the evaluation data")
        if self.prompt_template is not None and PROMPT_FIELD not in self.prompt_template:
            raise InputError(f"--prompt_template must contain {PROMPT_FIELD} where the prompt goes, "
                             f"got {self.prompt_template!r}")
        for flag in ("max_seq_length", "generation_max_new_tokens"):
            if getattr(self, flag) < 1:
                raise InputError(f"--{flag} must be positive, got {getattr(self, flag)}")
        train, evaluation = KNOWN_DATASETS.get(self.dataset_name), KNOWN_DATASETS.get(self.eval_dataset_name)
        self.dataset_config_name = self.dataset_config_name or (train.config if train else None)
        self.eval_dataset_config_name = self.eval_dataset_config_name or (evaluation.config if evaluation else None)
        self.prompt_column = self.prompt_column or (train.prompt_column if train else "prompt")
        self.response_column = self.response_column or (train.response_column if train else "response")
        self.eval_prompt_column = self.eval_prompt_column or (
            evaluation.prompt_column if evaluation else self.prompt_column
        )
        self.eval_response_column = self.eval_response_column or (
            evaluation.response_column if evaluation else self.response_column
        )
        if self.eval_split is None and self.eval_dataset_name is not None:
            if evaluation is not None and evaluation.eval_split is None:
                raise InputError(f"{self.eval_dataset_name} has no held-out split; "
                                 "pass --eval_dataset_name (e.g. gsm8k)")
            self.eval_split = evaluation.eval_split if evaluation else "validation"

    def _use_data_dir(self) -> None:
        """Local GSM8K copies replace the hub's wherever GSM8K is asked for, or where no data is named."""
        folder = Path(self.data_dir, "gsm8k")
        if not folder.is_dir():
            raise InputError(f"--data_dir {self.data_dir}: no folder {folder} "
                             "(expected gsm8k/train.jsonl and test.jsonl)")

        def is_gsm8k(name):
            return name is None or (name in KNOWN_DATASETS and KNOWN_DATASETS[name].path == GSM8K_PATH)

        if not self.train_file and is_gsm8k(self.dataset_name):
            self.train_file, self.dataset_name = str(folder / "train.jsonl"), None
            self.prompt_column, self.response_column = (self.prompt_column or "question",
                                                        self.response_column or "answer")
        if not self.validation_file and is_gsm8k(self.eval_dataset_name):
            self.validation_file, self.eval_dataset_name, self.eval_task = str(folder / "test.jsonl"), None, "gsm8k"
            self.eval_prompt_column = self.eval_prompt_column or "question"
            self.eval_response_column = self.eval_response_column or "answer"


def _load_hub(name: str, config: str | None, split: str, cache_dir: str | None) -> Dataset:
    path = KNOWN_DATASETS[name].path if name in KNOWN_DATASETS else name
    try:
        return load_dataset(path, config, split=split, cache_dir=cache_dir)
    except Exception as error:  # offline, unknown config or split, hub errors: several exception types
        raise InputError(
            f"could not load split {split!r} of dataset {path}: {str(error).strip().splitlines()[0]}"
        ) from error


def load_prompt_data(args: ClmDataArguments, cache_dir: str | None = None) -> dict[str, Dataset]:
    """{"train": ..., "validation": ...}, columns checked, first N rows if asked."""
    if args.train_file:
        train, train_source = read_data_file(args.train_file, cache_dir), args.train_file
    else:
        train = _load_hub(args.dataset_name, args.dataset_config_name, args.train_split, cache_dir)
        train_source = f"{args.dataset_name} ({args.train_split})"
    if args.validation_file:
        evaluation, eval_source = read_data_file(args.validation_file, cache_dir), args.validation_file
    else:
        evaluation = _load_hub(args.eval_dataset_name, args.eval_dataset_config_name, args.eval_split, cache_dir)
        eval_source = f"{args.eval_dataset_name} ({args.eval_split})"
    require_columns(train, (args.prompt_column, args.response_column), train_source)
    require_columns(evaluation, (args.eval_prompt_column, args.eval_response_column), eval_source)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))
    return {"train": train, "validation": evaluation}


class PromptFormatter:
    """Token ids of a prompt (ready for the response to follow) and of a response (ending in EOS)."""

    def __init__(self, tokenizer, template: str | None = None, use_chat_template: bool = True):
        if tokenizer.eos_token_id is None:
            raise InputError("the tokenizer has no EOS token, so a response could never end; set eos_token")
        self.tokenizer = tokenizer
        self.template = template
        self.chat = bool(use_chat_template and getattr(tokenizer, "chat_template", None))

    def prompt_text(self, prompt: str) -> str:
        return self.template.replace(PROMPT_FIELD, prompt) if self.template else prompt

    def prompt_ids(self, prompt: str) -> list[int]:
        text = self.prompt_text(prompt)
        if self.chat:
            return self._chat_ids([{"role": "user", "content": text}], add_generation_prompt=True)
        return self._without_closing_eos(self.tokenizer(text)["input_ids"])

    def _without_closing_eos(self, ids: list[int]) -> list[int]:
        """Prompt ids without the EOS that some tokenizers append to every text."""
        eos, bos = self.tokenizer.eos_token_id, self.tokenizer.bos_token_id
        return ids[:-1] if ids and ids[-1] == eos and eos != bos else ids

    def pair_ids(self, prompt: str, response: str) -> tuple[list[int], list[int]]:
        prompt_ids = self.prompt_ids(prompt)
        if not self.chat:
            response_ids = self.tokenizer(response, add_special_tokens=False)["input_ids"]
            return prompt_ids, response_ids + [self.tokenizer.eos_token_id]
        messages = [{"role": "user", "content": self.prompt_text(prompt)}, {"role": "assistant", "content": response}]
        full = self._chat_ids(messages, add_generation_prompt=False)
        if full[: len(prompt_ids)] != prompt_ids:
            raise InputError("the tokenizer's chat template does not continue its generation prompt with the "
                             "response; pass --use_chat_template false (and a --prompt_template)")
        return prompt_ids, full[len(prompt_ids):]

    def pairs(self, prompts: list[str], responses: list[str]) -> list[tuple[list[int], list[int]]]:
        """`pair_ids` of many rows; without a chat template, one batched tokenizer call per side."""
        if self.chat:
            return [self.pair_ids(prompt, response) for prompt, response in zip(prompts, responses)]
        prompt_ids = self.tokenizer([self.prompt_text(prompt) for prompt in prompts])["input_ids"]
        response_ids = self.tokenizer(list(responses), add_special_tokens=False)["input_ids"]
        eos = self.tokenizer.eos_token_id
        return [(self._without_closing_eos(p), r + [eos]) for p, r in zip(prompt_ids, response_ids)]

    def _chat_ids(self, messages, add_generation_prompt: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def fit_prompt(prompt_ids: list[int], room: int, bos_token_id: int | None) -> list[int]:
    """The last `room` tokens of the prompt, keeping a leading BOS."""
    if len(prompt_ids) <= room:
        return prompt_ids
    if bos_token_id is not None and prompt_ids[0] == bos_token_id and room > 1:
        return prompt_ids[:1] + prompt_ids[len(prompt_ids) - room + 1:]
    return prompt_ids[len(prompt_ids) - room:]


def encode_pair(prompt_ids: list[int], response_ids: list[int], max_length: int, bos_token_id=None):
    """(input_ids, labels, prompt was cut), or None if the response leaves no room for a prompt token."""
    room = max_length - len(response_ids)
    if room < 1:
        return None
    kept = fit_prompt(prompt_ids, room, bos_token_id)
    return kept + response_ids, [IGNORE_INDEX] * len(kept) + response_ids, len(kept) < len(prompt_ids)


@dataclass
class EncodedSplit:
    features: Dataset  # input_ids, labels: what the loss is computed on
    dropped: list[int]  # rows whose response did not fit (0-based)
    truncated: int  # rows whose prompt lost tokens on the left


def encode_split(dataset: Dataset, formatter: PromptFormatter, args: ClmDataArguments, *, prompt_column: str,
                 response_column: str, source: str, drop_overlong: bool) -> EncodedSplit:
    """Tokenise prompt + response (cached by `datasets`); overlong rows dropped and counted, or refused."""

    def encode(batch, indices):
        rows = {"input_ids": [], "labels": [], "truncated": [], "row": []}
        pairs = formatter.pairs(batch[prompt_column], batch[response_column])
        for index, (prompt_ids, response_ids) in zip(indices, pairs):
            encoded = encode_pair(prompt_ids, response_ids, args.max_seq_length, formatter.tokenizer.bos_token_id)
            input_ids, labels, truncated = encoded if encoded else ([], [], False)
            rows["input_ids"].append(input_ids)
            rows["labels"].append(labels)
            rows["truncated"].append(truncated)
            rows["row"].append(index)
        return rows

    encoded = dataset.map(
        encode,
        batched=True,
        with_indices=True,
        num_proc=args.preprocessing_num_workers,
        remove_columns=dataset.column_names,
        load_from_cache_file=not args.overwrite_cache,
        desc=f"Tokenizing {source}",
    )
    lengths = encoded["input_ids"]
    dropped = [row for row, ids in zip(encoded["row"], lengths) if not ids]
    if dropped and not drop_overlong:
        raise InputError(f"{source}: row {dropped[0] + 1} has a response longer than --max_seq_length "
                         f"{args.max_seq_length} ({len(dropped)} such rows); raise it or pass --drop_overlong true")
    if len(dropped) == len(encoded):
        raise InputError(f"{source}: no row fits in --max_seq_length {args.max_seq_length}")
    truncated = sum(encoded["truncated"])
    features = encoded.filter(lambda ids: len(ids) > 0, input_columns="input_ids") if dropped else encoded
    return EncodedSplit(features.remove_columns(["truncated", "row"]), dropped, truncated)


def generation_prompts(dataset: Dataset, formatter: PromptFormatter, args: ClmDataArguments) -> list[list[int]]:
    """Prompt ids of every evaluation row (overlong ones too), cut from the left to --max_seq_length."""
    bos = formatter.tokenizer.bos_token_id
    return [fit_prompt(formatter.prompt_ids(p), args.max_seq_length, bos) for p in dataset[args.eval_prompt_column]]


def pad_id(tokenizer) -> int:
    """The pad id, or EOS for tokenizers without one (Llama): padding is masked and never a label."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


class PaddingCollator:
    """Pads each batch to its longest row (right side): pad id in inputs, -100 in labels, 0 in the mask."""

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None):
        self.pad_token_id = pad_token_id
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(f["input_ids"]) for f in features)
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        batch = {"input_ids": [], "attention_mask": [], "labels": []}
        for f in features:
            padding = length - len(f["input_ids"])
            batch["input_ids"].append(list(f["input_ids"]) + [self.pad_token_id] * padding)
            batch["attention_mask"].append([1] * len(f["input_ids"]) + [0] * padding)
            batch["labels"].append(list(f["labels"]) + [IGNORE_INDEX] * padding)
        return {key: torch.tensor(value, dtype=torch.long) for key, value in batch.items()}


def left_padded(prompts: list[list[int]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """A generation batch: prompts end at the same position, so new tokens follow every prompt directly."""
    length = max(len(p) for p in prompts)
    input_ids = [[pad_token_id] * (length - len(p)) + list(p) for p in prompts]
    mask = [[0] * (length - len(p)) + [1] * len(p) for p in prompts]
    return {"input_ids": torch.tensor(input_ids), "attention_mask": torch.tensor(mask)}
