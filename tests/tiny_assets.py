"""Tiny models, tokenizers and data files written to disk, as a user's local folders would be."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers, processors, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    PreTrainedTokenizerFast,
    RobertaConfig,
    RobertaModel,
)

WORDS = "good bad great awful fine poor movie food plot staff service story acting cheap slow fast kind rude".split()
SPECIAL = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]


def sentence(rng: random.Random, length: int = 6) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(length))


def write_tokenizer(folder: Path) -> PreTrainedTokenizerFast:
    """A word-level tokenizer trained on the fly, saved so `AutoTokenizer` reloads it."""
    tokenizer = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.train_from_iterator([" ".join(WORDS + list(".,!?"))], trainers.WordLevelTrainer(special_tokens=SPECIAL))
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>",
    )
    fast.save_pretrained(folder)
    return fast


def write_tiny_roberta(folder: Path) -> Path:
    """A headless encoder, as pretrained checkpoints are: each task gets a fresh head of its size."""
    tokenizer = write_tokenizer(folder)
    config = RobertaConfig(
        vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2,
    )
    RobertaModel(config, add_pooling_layer=False).save_pretrained(folder)
    return folder


def write_tiny_bart(folder: Path) -> Path:
    tokenizer = write_tokenizer(folder)
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=80,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2,
        forced_eos_token_id=2,
    )
    BartForConditionalGeneration(config).save_pretrained(folder)
    return folder


def glue_rows(task: str, n: int, seed: int) -> list[dict]:
    """Rows in the HF `glue` schema of `task`, with labels that depend on the text."""
    from lorpa.tasks.metrics import GLUE_TASKS

    spec = GLUE_TASKS[task]
    rng = random.Random(seed)
    rows = []
    for idx in range(n):
        row = {column: sentence(rng) for column in spec.text_columns}
        positive = sum(row[c].split().count("good") for c in spec.text_columns)
        if spec.is_regression:
            row["label"] = float(min(5, positive))
        else:
            row["label"] = min(spec.num_labels - 1, positive)
        row["idx"] = idx
        rows.append(row)
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


CHAT_TEMPLATE = (  # the shape of Qwen2's: every turn closed by <|im_end|>, generation prompt opens the assistant turn
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def write_tiny_decoder(folder: Path, kind: str = "llama", hidden_size: int = 32) -> Path:
    """A tiny causal LM and byte-level BPE tokenizer trained on generated GSM8K-format problems.

    llama: BOS-only post-processing, no pad token, no chat template (a base Llama checkpoint).
    qwen2: a pad token and a chat template whose turns end in <|im_end|> (a Qwen2 instruct checkpoint).
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    from lorpa.tasks.clm.arithmetic import arithmetic_rows

    special = ["<s>", "</s>", "<unk>"] + (["<|endoftext|>", "<|im_start|>", "<|im_end|>"] if kind == "qwen2" else [])
    bpe = ByteLevelBPETokenizer()
    texts = ([text for row in arithmetic_rows(300, 99) for text in row.values()]
             + ["Question: Think step by step. Answer:"])
    bpe.train_from_iterator(texts, vocab_size=400, special_tokens=special)
    if kind == "llama":
        bpe.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
        config_class, model_class, extra = LlamaConfig, LlamaForCausalLM, {"bos_token_id": 0, "eos_token_id": 1}
    else:
        tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                            unk_token="<unk>")
        tokenizer.chat_template = CHAT_TEMPLATE
        config_class, model_class = Qwen2Config, Qwen2ForCausalLM
        extra = {"eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id}
    config = config_class(
        vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=2 * hidden_size, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=False, **extra,
    )
    model_class(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
