"""Calibration for the output-space score: the second moments of each LoRA layer's activations.

A layer applies ΔW = s·B·A only to the inputs X it actually receives, and those are far from isotropic.
With Z = A·X (the r activations of the LoRA branch, which the forward pass computes anyway), the r × r
matrix G = Z·Zᵀ summed over the real tokens is all that the output-space truncation
(`score="activation"`) and the prune report's output error need: no in × in matrix is formed.

`calibrate` records G on every LoRA layer, as the sensitivity score keeps its state on the layers, from
forward passes in eval mode without gradients, and leaves the model's outputs, the train/eval mode of
every module and the random number generators as it found them.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .errors import InputError
from .layers import base_model, layer_state, lora_layers, resolve_adapter, set_layer_state, unwrap

CALIBRATION_ATTR = "_lorpa_calibration"
TOKENS = ("real", "loss")
IGNORE_INDEX = -100


@dataclass
class LayerCalibration:
    gram: torch.Tensor  # r × r, float64: Σ z·zᵀ over the counted tokens, z = A·x
    tokens: int


def layer_calibration(layer: nn.Module, adapter_name: str) -> LayerCalibration | None:
    return layer_state(layer, CALIBRATION_ATTR, adapter_name)


def token_masks(batch: dict, tokens: str, encoder_decoder: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(mask of the input sequence, mask of the decoder sequence), each (batch, length) bool or None (count all).

    `real`: the positions the attention masks keep; a seq2seq decoder without its own mask reads the labels
    shifted right, so its position t is real when t = 0 or labels[t − 1] ≠ -100. `loss`: the positions
    whose prediction the loss counts: in a causal LM input t predicts token t + 1 (counted when
    labels[t + 1] ≠ -100); a seq2seq decoder's position t predicts labels[t], and its encoder keeps `real`.
    """
    attention, labels, decoder = batch.get("attention_mask"), batch.get("labels"), batch.get("decoder_attention_mask")
    source = None if attention is None else attention.bool()
    counted = None if labels is None or labels.dim() != 2 else labels != IGNORE_INDEX
    if tokens == "loss" and counted is None:
        raise InputError("tokens='loss' needs batches with labels (the positions the loss counts)")
    if not encoder_decoder:
        if tokens == "real":
            return source, None
        shifted = torch.zeros_like(counted)
        shifted[:, :-1] = counted[:, 1:]
        return shifted, None
    if tokens == "loss":
        return source, counted
    if decoder is not None:
        return source, decoder.bool()
    if counted is None:
        return source, None
    real = torch.ones_like(counted)
    real[:, 1:] = counted[:, :-1]
    return source, real


def _choose_mask(shape, on_decoder: bool, masks) -> torch.Tensor | None:
    """The mask whose (batch, length) is the activation's: decoder-side layers prefer the decoder's; a
    decoder-side layer that sees the encoder's length reads encoder states (cross-attention keys and values)."""
    source, target = masks
    order = (target, source) if on_decoder else (source,)
    for mask in order:
        if mask is not None and tuple(mask.shape) == tuple(shape):
            return mask
    return None


@contextmanager
def untouched(model: nn.Module):
    """Eval mode and no gradients inside; every module's mode and every RNG restored after."""
    modes = {module: module.training for module in model.modules()}
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes.items():
            module.training = training
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)


def calibrate(model: nn.Module, batches: Iterable[dict], *, tokens: str = "real",
              adapter_name: str | None = None) -> int:
    """Record G = Σ (A·x)(A·x)ᵀ on every LoRA layer, over the tokens of `batches` (dicts of the model's inputs,
    as a Trainer's data loader yields them); returns the tokens counted (largest over layers, all processes).

    tokens: "real" counts every position the attention mask keeps (padding is masked); "loss" only the
        positions the loss counts (for causal LMs, those whose next token has a label).
    An earlier calibration of the same adapter is replaced. Under torch.distributed every process passes its
    own batches and the Grams are summed across processes, so every process prunes with the same G.
    """
    if tokens not in TOKENS:
        raise InputError(f"unknown tokens {tokens!r}; choose one of {', '.join(TOKENS)}")
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    layers = lora_layers(model, adapter_name)
    for name, layer in layers.items():
        if adapter_name in layer.merged_adapters:
            raise InputError(f"{name}: adapter {adapter_name!r} is merged into the base weights; unmerge it first")
    base = base_model(model)
    encoder = base.get_encoder() if getattr(getattr(base, "config", None), "is_encoder_decoder", False) else None
    encoder_modules = set() if encoder is None else {id(m) for m in encoder.modules()}
    grams = dict.fromkeys(layers)
    counts = dict.fromkeys(layers, 0)
    current = {"masks": (None, None)}

    def hook(name, on_decoder):
        def record(module, inputs, output):
            z = output.detach()
            mask = _choose_mask(z.shape[:-1], on_decoder, current["masks"]) if z.dim() >= 3 else None
            z = z[mask.to(z.device)] if mask is not None else z.reshape(-1, z.shape[-1])
            z = z.float()
            product = (z.t() @ z).double()
            grams[name] = product if grams[name] is None else grams[name] + product
            counts[name] += z.shape[0]
        return record

    handles = [layer.lora_A[adapter_name].register_forward_hook(
        hook(name, encoder is not None and id(layer) not in encoder_modules)) for name, layer in layers.items()]
    device = next(model.parameters()).device
    try:
        with untouched(model):
            for batch in batches:
                batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
                current["masks"] = token_masks(batch, tokens, encoder is not None)
                model(**batch)
    finally:
        for handle in handles:
            handle.remove()
    for name, layer in layers.items():  # a layer no token reached (e.g. a decoder given no labels) has G = 0
        if grams[name] is None:
            rank = layer.r[adapter_name]
            grams[name] = torch.zeros(rank, rank, dtype=torch.float64, device=device)
    _sum_across_processes(grams, counts)
    if not any(counts.values()):
        raise InputError("calibration saw no tokens: give at least one batch with unmasked positions")
    for name, layer in layers.items():
        set_layer_state(layer, CALIBRATION_ATTR, adapter_name, LayerCalibration(grams[name], counts[name]))
    return max(counts.values())


def _sum_across_processes(grams: dict, counts: dict) -> None:
    """Sum every layer's G and token count over the processes, in one collective."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return
    flat = torch.cat([torch.cat([grams[name].reshape(-1), grams[name].new_tensor([counts[name]])]) for name in grams])
    dist.all_reduce(flat)
    offset = 0
    for name, gram in grams.items():
        size = gram.numel()
        grams[name] = flat[offset : offset + size].reshape(gram.shape)
        counts[name] = int(flat[offset + size].item())
        offset += size + 1


TOKENS_PER_RANK = 64  # default calibration size: 64 tokens per unit of the largest LoRA rank (G is r × r)


def trainer_batches(trainer, count: int | None = None, min_tokens: int | None = None):
    """Calibration batches from a Trainer: its training set in order (no shuffling, so a resumed run calibrates
    as an uninterrupted one), collated and split over processes as for evaluation. `count` batches, or with
    count None as many as hold `min_tokens` real tokens over all processes."""
    world = getattr(trainer.args, "world_size", 1) or 1
    wanted = None if min_tokens is None else -(-min_tokens // world)
    seen = 0
    for index, batch in enumerate(trainer.get_eval_dataloader(trainer.train_dataset)):
        if (count is not None and index >= count) or (count is None and wanted is not None and seen >= wanted):
            return
        yield batch
        mask = batch.get("attention_mask")
        seen += int(mask.sum()) if mask is not None else int(batch["input_ids"].numel())


def trainer_rows(trainer, rows: int):
    """Batches of a Trainer's training set in order (collated and split over processes as for evaluation) that hold
    `rows` rows over all processes (a few more when the last batch is whole)."""
    world = getattr(trainer.args, "world_size", 1) or 1
    wanted, seen = -(-rows // world), 0
    for batch in trainer.get_eval_dataloader(trainer.train_dataset):
        if seen >= wanted:
            return
        yield batch
        seen += len(next(v for v in batch.values() if isinstance(v, torch.Tensor)))


def calibration_tokens_wanted(model, adapter_name: str | None = None) -> int:
    """The default calibration size for `model`: TOKENS_PER_RANK tokens per unit of its largest LoRA rank."""
    model = unwrap(model)
    adapter_name = resolve_adapter(model, adapter_name)
    return TOKENS_PER_RANK * max(layer.r[adapter_name] for layer in lora_layers(model, adapter_name).values())
