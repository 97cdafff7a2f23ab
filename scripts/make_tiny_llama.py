#!/usr/bin/env python
"""Write a tiny randomly initialised LLaMA, a byte-level BPE tokenizer, and generated GSM8K-format data.

No pretrained decoder LM installs offline, so the CLM smoke config runs on this model. Its answers
mean nothing at first (random weights); the run exercises the whole pipeline. The tokenizer has
no pad token and no chat template, like a base Llama checkpoint.

    python scripts/make_tiny_llama.py runs/tiny-llama          # model in runs/tiny-llama/model,
                                                               # data in runs/tiny-llama/data/gsm8k
    python scripts/make_tiny_llama.py runs/tiny-llama-gsm8k --tokenizer_data DIR/gsm8k/train.jsonl
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from lorpa.tasks.clm.arithmetic import write_arithmetic_gsm8k  # noqa: E402

SPECIAL = ["<s>", "</s>", "<unk>"]


def texts(path: Path):
    with path.open() as lines:
        for line in lines:
            row = json.loads(line)
            yield row["question"]
            yield row["answer"]


def train_tokenizer(data: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=False)
    tokenizer.train_from_iterator(texts(data), vocab_size=vocab_size, special_tokens=SPECIAL)
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   model_max_length=1024)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--tokenizer_data", type=Path, default=None,
                        help="JSON Lines with question and answer to train the tokenizer on "
                             "(default: the generated data)")
    parser.add_argument("--vocab_size", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.tokenizer_data is not None and not args.tokenizer_data.is_file():
        parser.error(f"data file not found: {args.tokenizer_data}")

    data = write_arithmetic_gsm8k(args.output_dir / "data", seed=args.seed)
    tokenizer = train_tokenizer(args.tokenizer_data or data / "train.jsonl", args.vocab_size)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model_dir = args.output_dir / "model"
    LlamaForCausalLM(config).save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    print(f"tiny LLaMA ({config.vocab_size} tokens) in {model_dir}, GSM8K-format data in {data}")


if __name__ == "__main__":
    main()
