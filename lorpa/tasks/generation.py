"""Evaluation by generation with the adapters merged into the base weights.

Generation runs the decoder once per output token (and beam), so an unmerged adapter's extra
matmuls are paid hundreds of times per example. Merging makes every adapted layer a plain linear
layer for the duration of an evaluation; afterwards the model is unmerged again, so training and
pruning see the separate LoRA factors they work on.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers import Seq2SeqTrainer

from ..layers import base_model, unwrap


@contextmanager
def merged_adapters(model: nn.Module):
    """Merge the active adapters of a peft model (LoRA, AdaLoRA) into its base weights inside the block.

    Unmerging subtracts what merging added, which is exact only up to float rounding; the frozen
    weights are restored from a copy instead, so evaluating never changes what training continues
    from. Models without adapters, or already merged, are left as they are.
    """
    model = unwrap(model)
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)] if isinstance(model, PeftModel) else []
    if not layers or any(layer.merged for layer in layers):
        yield
        return
    frozen = [p for layer in layers for p in layer.get_base_layer().parameters()]
    saved = [p.detach().clone() for p in frozen]
    model.merge_adapter()
    try:
        yield
    finally:
        model.unmerge_adapter()
        with torch.no_grad():
            for parameter, value in zip(frozen, saved):
                parameter.copy_(value)


class MergedGenerationTrainer(Seq2SeqTrainer):
    """A Seq2SeqTrainer whose `evaluate` and `predict` generate with merged adapters.

    `generation_kwargs` (e.g. `length_penalty`) apply to every evaluation, including the ones the
    Trainer runs during training, where no keyword arguments can be passed. `--generation_config`
    reaches the model that generates, also under a peft wrapper.
    """

    def __init__(self, *args, generation_kwargs: dict | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.generation_kwargs = dict(generation_kwargs or {})
        if self.args.generation_config is not None:  # set on the peft wrapper, whose `generate` never reads it
            base_model(self.model).generation_config = self.model.generation_config

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval", **gen_kwargs):
        gen_kwargs = {**self.generation_kwargs, **gen_kwargs}
        with merged_adapters(self.model):
            return super().evaluate(eval_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)

    def predict(self, test_dataset, ignore_keys=None, metric_key_prefix="test", **gen_kwargs):
        gen_kwargs = {**self.generation_kwargs, **gen_kwargs}
        with merged_adapters(self.model):
            return super().predict(test_dataset, ignore_keys, metric_key_prefix, **gen_kwargs)
