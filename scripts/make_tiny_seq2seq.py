#!/usr/bin/env python
"""Write a tiny randomly initialised BART, a byte-level BPE tokenizer, and generated articles to train it on.

No pretrained sequence-to-sequence model installs offline, so the summarization smoke config runs
on this one. Its scores mean nothing (the weights start random); it exercises the whole pipeline.
The articles (XSum columns, from lorpa/tasks/demo_data.py) go to OUTPUT_DIR/data/{train,validation}.jsonl,
where the smoke config reads them; the tokenizer is trained on them, or on `--data FILE` (any
JSON Lines file with document and summary columns, e.g. a local copy of XSum).

    python scripts/make_tiny_seq2seq.py runs/tiny-seq2seq
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tokenizers import ByteLevelBPETokenizer, processors
from transformers import BartConfig, BartForConditionalGeneration, PreTrainedTokenizerFast

from lorpa.tasks.demo_data import write_demo_summaries

SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0-4


def texts(path: Path):
    with path.open() as lines:
        for line in lines:
            row = json.loads(line)
            yield row["document"]
            yield row["summary"]


def train_tokenizer(data: Path, vocab_size: int) -> PreTrainedTokenizerFast:
    tokenizer = ByteLevelBPETokenizer(add_prefix_space=True)
    tokenizer.train_from_iterator(texts(data), vocab_size=vocab_size, special_tokens=SPECIAL)
    tokenizer.post_processor = processors.RobertaProcessing(("</s>", 2), ("<s>", 0))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=512,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--data", type=Path, default=None,
                        help="JSON Lines with document and summary to train the tokenizer on "
                             "(default: the generated articles)")
    parser.add_argument("--vocab_size", type=int, default=4000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.data is not None and not args.data.is_file():
        parser.error(f"data file not found: {args.data} (given by --data)")

    generated = write_demo_summaries(args.output_dir / "data", seed=args.seed)
    tokenizer = train_tokenizer(args.data or generated["train"], args.vocab_size)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256, max_position_embeddings=512,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=2,
    )
    torch.manual_seed(args.seed)
    BartForConditionalGeneration(config).save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    print(f"tiny BART ({config.vocab_size} tokens), tokenizer and generated articles ({args.output_dir / 'data'}) "
          f"written to {args.output_dir}")


if __name__ == "__main__":
    main()
