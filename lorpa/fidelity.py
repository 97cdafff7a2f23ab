"""How much did the cut change the model's answers? Label-free fidelity of the pruned model to the uncut adapter.

The uncut model's output at every compared position of some unlabelled inputs is recorded first (`reference`),
then the pruned model's is compared with it (`compare`): the share of positions whose top-1 answer is unchanged,
and KL(uncut ‖ pruned) per position, its mean and percentiles; for language models with labels the ratio of the
perplexities; for a regression head (one output) the squared difference of the predictions over the variance of
the uncut ones, which is also the KL between Gaussians of that variance around them (halved). Compared positions:
a classifier's rows; a causal LM's positions whose next token the loss counts (or every real token without
labels); a seq2seq decoder's labelled positions. No second model is held: the reference is taken before the cut
(the stage loop), or with the uncut adapter loaded beside the pruned ones on the same base (`lorpa prune
--base_model`).

Large vocabularies: the reference keeps each position's top `top_k` log-probabilities and the mass of the rest, and
the KL is that of the (top_k + 1)-bucket distributions. That is a lower bound of the full KL, short of it by
p_rest · KL(rest ‖ rest′) with p_rest the reference's mass outside its top k, recorded as `reference_tail`; with as
few classes as `top_k` (any classifier) it is the exact KL.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from .calibration import IGNORE_INDEX, untouched
from .errors import InputError
from .layers import unwrap

TOP_K = 128  # reference log-probabilities kept per position
FLAT_TAIL = 0.1  # a mean reference mass outside the top k above this is said with the fidelity (docs/sizing.md)
METRICS = ("agreement", "kl", "score")  # what a tolerance search can hold a candidate to


@dataclass
class Fidelity:
    """The pruned model against the uncut one on the same inputs (percent, nats)."""

    agreement: float | None  # percent of compared positions whose top-1 answer is unchanged (None: regression)
    kl_mean: float  # mean KL(uncut ‖ pruned) per position
    kl_p50: float
    kl_p90: float
    kl_p99: float
    positions: int
    perplexity_ratio: float | None = None  # pruned / uncut perplexity of the label tokens (language models)
    prediction_error: float | None = None  # regression: mean squared difference / variance of the uncut predictions
    reference_tail: float | None = None  # mean uncut mass outside its kept top k: the KL is short by it × KL within it

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        agreement = "" if self.agreement is None else f"{self.agreement:.2f}% of top-1 answers unchanged, "
        ratio = "" if self.perplexity_ratio is None else f", perplexity ×{self.perplexity_ratio:.4f}"
        tail = "" if (self.reference_tail or 0) < FLAT_TAIL else (
            f"; {100 * self.reference_tail:.0f}% of the uncut probability lies outside its top {TOP_K} answers: "
            "nearly flat, so the KL is a loose lower bound and top-1 answers are near ties")
        return (f"{agreement}KL mean {self.kl_mean:.3g} (p50 {self.kl_p50:.3g}, p90 {self.kl_p90:.3g}, p99 "
                f"{self.kl_p99:.3g}) over {self.positions} positions{ratio}{tail}")


@dataclass
class Reference:
    """The uncut model's outputs at the compared positions of each batch."""

    regression: bool
    batches: list[dict] = field(default_factory=list)  # per batch: mask, top (log p, index), rest, label log p


def positions(model: nn.Module, batch: dict, output: torch.Tensor):
    """(outputs at the compared positions: (n, classes), their label tokens or None)."""
    if output.dim() == 2:  # a sequence classifier or regressor: one answer per row
        return output, None
    labels, attention = batch.get("labels"), batch.get("attention_mask")
    config = getattr(unwrap(model), "config", None)
    if getattr(config, "is_encoder_decoder", False):  # the decoder's position t predicts labels[t]
        counted = labels != IGNORE_INDEX if labels is not None else batch.get("decoder_attention_mask")
        targets = labels
    else:  # position t predicts token t + 1
        output = output[:, :-1]
        targets = None if labels is None else labels[:, 1:]
        counted = targets != IGNORE_INDEX if labels is not None else None
        if counted is None and attention is not None:
            counted = attention[:, 1:].bool()
    if counted is None:
        counted = torch.ones(output.shape[:2], dtype=torch.bool, device=output.device)
    counted = counted.to(output.device).bool()
    return output[counted], None if targets is None else targets.to(output.device)[counted]


def _outputs(model: nn.Module, batches: list[dict]):
    """Each batch's compared outputs and label tokens, the model in eval mode, nothing else touched."""
    device = next(model.parameters()).device
    with untouched(model):
        for batch in batches:
            batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            output = model(**batch).logits
            values, targets = positions(model, batch, output)
            yield values.double(), targets  # float64: a small KL is a difference of nearly equal numbers


def reference(model: nn.Module, batches: list[dict], top_k: int = TOP_K) -> Reference:
    """The uncut model's outputs on `batches` (dicts of its inputs, as a Trainer's data loader yields them)."""
    recorded = None
    for values, targets in _outputs(model, batches):
        if recorded is None:
            recorded = Reference(regression=values.shape[-1] == 1)
        if recorded.regression:
            recorded.batches.append({"value": values[:, 0].cpu()})
            continue
        log_p = torch.log_softmax(values, dim=-1)
        top, index = torch.topk(log_p, min(top_k, log_p.shape[-1]), dim=-1)
        rest = torch.log1p(-top.exp().sum(-1).clamp(max=1 - 1e-12)) if index.shape[-1] < log_p.shape[-1] else None
        label = None if targets is None else log_p.gather(-1, targets.clamp_min(0)[:, None])[:, 0]
        recorded.batches.append({"top": top.cpu(), "index": index.cpu(), "rest": None if rest is None else rest.cpu(),
                                 "label": None if label is None else label.cpu(), "argmax": index[:, 0].cpu()})
    if recorded is None:
        raise InputError("fidelity needs at least one batch of inputs")
    return recorded


def _gather(values: list) -> list:
    """Every process's list, concatenated (under torch.distributed), in process order."""
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return values
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, values)
    return [value for part in gathered for value in part]


def _percentile(sorted_values: list[float], q: float) -> float:
    """The q-quantile by linear interpolation (numpy's default)."""
    position = q * (len(sorted_values) - 1)
    low = math.floor(position)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (position - low)


def compare(model: nn.Module, batches: list[dict], recorded: Reference) -> Fidelity:
    """The pruned `model` against `recorded` (`reference` of the uncut one on the same `batches`); under
    torch.distributed every process passes its own batches and gets the numbers over all of them."""
    kls, same, tails, squared, predictions = [], [], [], [], []
    nll_uncut = nll_pruned = labelled = 0
    for (values, targets), uncut in zip(_outputs(model, batches), recorded.batches):
        if recorded.regression:
            squared += (values[:, 0].cpu().double() - uncut["value"].double()).square().tolist()
            predictions += uncut["value"].double().tolist()
            continue
        log_q = torch.log_softmax(values, dim=-1).cpu()
        top, index = uncut["top"], uncut["index"]
        q_top = log_q.gather(-1, index)
        kl = (top.exp() * (top - q_top)).sum(-1)
        if uncut["rest"] is not None:  # the rest as one bucket: p_rest·log(p_rest / q_rest)
            q_rest = torch.log1p(-q_top.exp().sum(-1).clamp(max=1 - 1e-12))
            kl = kl + uncut["rest"].exp() * (uncut["rest"] - q_rest)
            tails += uncut["rest"].exp().tolist()
        kls += kl.clamp_min(0).double().tolist()
        same += (log_q.argmax(-1) == uncut["argmax"]).tolist()
        if targets is not None and uncut["label"] is not None:
            nll_uncut -= float(uncut["label"].double().sum())
            nll_pruned -= float(log_q.gather(-1, targets.cpu().clamp_min(0)[:, None]).double().sum())
            labelled += len(targets)
    if recorded.regression:
        squared, predictions = _gather(squared), _gather(predictions)
        variance = max(torch.tensor(predictions).var(unbiased=False).item(), 1e-12)
        kls = [difference / (2 * variance) for difference in squared]
        error, agreement = sum(squared) / len(squared) / variance, None
    else:
        kls, same, tails = _gather(kls), _gather(same), _gather(tails)
        agreement, error = 100 * sum(same) / len(same), None
    nll_uncut, nll_pruned, labelled = (sum(part) for part in zip(*_gather([(nll_uncut, nll_pruned, labelled)])))
    ratio = math.exp((nll_pruned - nll_uncut) / labelled) if labelled else None
    ordered = sorted(kls)
    return Fidelity(agreement, sum(ordered) / len(ordered), _percentile(ordered, 0.5), _percentile(ordered, 0.9),
                    _percentile(ordered, 0.99), len(ordered), ratio, error, sum(tails) / len(tails) if tails else None)


def label_free_metric(metric: str | None, recorded: Reference) -> str:
    """The label-free metric a tolerance search holds candidates to: the one asked for, else agreement (kl for a
    regression head, which gives no top-1 answer)."""
    metric = metric or ("kl" if recorded.regression else "agreement")
    if metric == "agreement" and recorded.regression:
        raise InputError("tolerance_metric agreement needs top-1 answers, which a regression head does not give; "
                         "use kl")
    return metric


def measured(fidelity: Fidelity, metric: str) -> float:
    """A candidate's value under a label-free metric: its agreement (%) or its mean KL."""
    return fidelity.agreement if metric == "agreement" else fidelity.kl_mean


def criterion(metric: str, batches: list[dict], recorded: Reference):
    """What a label-free tolerance search measures of each model (`label_free_metric`)."""
    return lambda model: measured(compare(model, batches, recorded), metric)


def read_rows(path: str, rows: int) -> list[str]:
    """The first `rows` texts of a calibration file: JSONL rows with a `text` field, or prompt/response (or
    question/answer) fields joined as `run_clm.py` joins them, or a plain text file, one row a line."""
    file = Path(path)
    if not file.is_file():
        raise InputError(f"--calibration_data {path}: no such file")
    texts = []
    for number, line in enumerate(file.read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        if file.suffix.lower() in (".jsonl", ".json"):
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise InputError(f"--calibration_data {path}, line {number}: not JSON ({error.msg})") from None
            fields = row if isinstance(row, dict) else {}
            pair = next(((fields[a], fields[b]) for a, b in PROMPT_FIELDS if a in fields and b in fields), None)
            if isinstance(row, dict) and isinstance(row.get("text"), str):
                line = row["text"]
            elif pair is not None:
                line = f"{pair[0]} {pair[1]}"
            else:
                raise InputError(f"--calibration_data {path}, line {number}: no text field (text, or prompt and "
                                 "response, or question and answer)")
        texts.append(line)
        if len(texts) == rows:
            break
    if not texts:
        raise InputError(f"--calibration_data {path}: no rows")
    return texts


PROMPT_FIELDS = (("prompt", "response"), ("question", "answer"))
HEADS = {"SEQ_CLS": "AutoModelForSequenceClassification", "SEQ_2_SEQ_LM": "AutoModelForSeq2SeqLM",
         "CAUSAL_LM": "AutoModelForCausalLM", "TOKEN_CLS": "AutoModelForTokenClassification"}


class AdapterComparison:
    """The uncut adapter and pruned candidates from files, on one base model loaded once: each candidate is loaded
    beside the uncut adapter (adapters are small), compared on the calibration rows, and unloaded."""

    def __init__(self, base_model: str, adapter_dir: Path, data: str, rows: int = 256, max_length: int = 256,
                 batch_size: int = 16):
        import transformers
        from peft import PeftModel

        from .adapter_files import CONFIG_FILE, read_config

        config = read_config(Path(adapter_dir, CONFIG_FILE))
        loader = getattr(transformers, HEADS.get(config.get("task_type") or "CAUSAL_LM", "AutoModelForCausalLM"))
        tokenizer_source = adapter_dir if Path(adapter_dir, "tokenizer_config.json").is_file() else base_model
        tokenizer = load_pretrained(transformers.AutoTokenizer, str(tokenizer_source))
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
        extra = {"num_labels": head_rows(adapter_dir)} if config.get("task_type") == "SEQ_CLS" else {}
        base = load_pretrained(loader, base_model, **extra)
        self.model = PeftModel.from_pretrained(base, adapter_dir, adapter_name="uncut").eval()
        texts = read_rows(data, rows)
        self.batches = [dict(tokenizer(texts[i:i + batch_size], padding=True, truncation=True, max_length=max_length,
                                       return_tensors="pt")) for i in range(0, len(texts), batch_size)]
        if getattr(base.config, "is_encoder_decoder", False):  # the decoder reads the rows too
            for batch in self.batches:
                batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        self.rows = len(texts)
        self.recorded = reference(self.model, self.batches)

    def measure(self, candidate: Path) -> Fidelity:
        self.model.load_adapter(str(candidate), adapter_name="candidate")
        self.model.set_adapter("candidate")
        try:
            return compare(self.model, self.batches, self.recorded)
        finally:
            self.model.set_adapter("uncut")
            self.model.delete_adapter("candidate")


def load_pretrained(loader, name: str, **kwargs):
    """`loader.from_pretrained(name)`, a missing or unreachable model reported as one line."""
    try:
        return loader.from_pretrained(name, **kwargs)
    except OSError as error:
        raise InputError(f"--base_model {name}: cannot be loaded ({str(error).strip().splitlines()[0]})") from None


def head_rows(adapter_dir: Path) -> int:
    """The classes of a sequence classifier's saved head (peft saves it with the adapter): its last 2-D weight's
    rows, where the model's config cannot be read without the head."""
    from .adapter_files import AdapterFolder

    weights = AdapterFolder(adapter_dir).weights
    heads = [key for key in weights.keys if ("classifier" in key or ".score." in key) and key.endswith("weight")
             and len(weights.shapes[key]) == 2]
    if not heads:
        raise InputError(f"{adapter_dir}: a SEQ_CLS adapter without its head (modules_to_save): the model cannot be "
                         "built")
    return weights.shapes[heads[-1]][0]
