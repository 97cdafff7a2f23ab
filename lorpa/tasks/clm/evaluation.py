"""Evaluation of a causal LM by greedy generation, next to the teacher-forced eval loss.

Every evaluation computes the loss on the response tokens (the Trainer's own loop), then generates
an answer for every evaluation prompt (batched, left-padded, greedy, adapters merged) and scores
the answers. Under DDP each process generates a strided share of the prompts and the answers are
gathered back into dataset order, so every process reports the same score.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from transformers import GenerationConfig, Trainer

from ...layers import unwrap
from ..generation import merged_adapters
from .data import left_padded


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the tokenizer and of the model's generation config (chat models end turns with their own)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured]
    return sorted({i for i in ids if i is not None})


class GenerationEvalTrainer(Trainer):
    """A Trainer whose evaluations also generate answers and score them with `score(answers, references)`.

    The answers of the latest evaluation are kept in `predictions`, in dataset order.
    """

    def __init__(self, *args, prompts: list[list[int]], references: list[str],
                 score: Callable[[list[str], list[str]], dict[str, float]], max_new_tokens: int, pad_token_id: int,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self.prompts, self.references, self.score = prompts, references, score
        self.max_new_tokens, self.pad_token_id = max_new_tokens, pad_token_id
        self.predictions: list[str] = []

    def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                        metric_key_prefix="eval"):
        output = super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys, metric_key_prefix)
        self.predictions = self.generate_answers()
        for name, value in self.score(self.predictions, self.references).items():
            output.metrics[f"{metric_key_prefix}_{name}"] = value
        return output

    @torch.no_grad()
    def generate_answers(self) -> list[str]:
        model = unwrap(self.model)
        world, rank = (dist.get_world_size(), dist.get_rank()) if dist.is_initialized() else (1, 0)
        mine = list(range(rank, len(self.prompts), world))
        mine.sort(key=lambda i: len(self.prompts[i]))  # similar lengths together: less padding
        config = GenerationConfig(
            max_new_tokens=self.max_new_tokens, do_sample=False, num_beams=1, use_cache=True,
            pad_token_id=self.pad_token_id, eos_token_id=stop_token_ids(model, self.processing_class),
        )
        answers = {}
        was_training = model.training
        model.eval()
        with merged_adapters(model):
            for start in range(0, len(mine), self.args.per_device_eval_batch_size):
                chunk = mine[start : start + self.args.per_device_eval_batch_size]
                batch = {k: v.to(self.args.device)
                         for k, v in left_padded([self.prompts[i] for i in chunk], self.pad_token_id).items()}
                generated = model.generate(**batch, generation_config=config)[:, batch["input_ids"].shape[1]:]
                texts = self.processing_class.batch_decode(generated, skip_special_tokens=True)
                answers.update(zip(chunk, (text.strip() for text in texts)))
        model.train(was_training)
        if world > 1:
            shares = [None] * world
            dist.all_gather_object(shares, answers)
            answers = {i: text for share in shares for i, text in share.items()}
        return [answers[i] for i in range(len(self.prompts))]
