"""Offline evaluation metrics for GLUE and summarization.

Built on scikit-learn, scipy and rouge-score directly, because the
`evaluate` library downloads its metric scripts and fails offline.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from rouge_score import rouge_scorer
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


@dataclass(frozen=True)
class GlueTask:
    """What the data and training code need to know about one GLUE task."""

    name: str
    text_columns: tuple[str, ...]
    num_labels: int
    main_metric: str
    is_regression: bool = False
    eval_splits: tuple[str, ...] = ("validation",)


GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask("cola", ("sentence",), 2, "matthews_correlation"),
        GlueTask("sst2", ("sentence",), 2, "accuracy"),
        GlueTask("mrpc", ("sentence1", "sentence2"), 2, "f1"),
        GlueTask("qqp", ("question1", "question2"), 2, "accuracy"),
        GlueTask("stsb", ("sentence1", "sentence2"), 1, "pearson", is_regression=True),
        GlueTask(
            "mnli",
            ("premise", "hypothesis"),
            3,
            "accuracy",
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        GlueTask("qnli", ("question", "sentence"), 2, "accuracy"),
        GlueTask("rte", ("sentence1", "sentence2"), 2, "accuracy"),
    )
}


def get_glue_task(task_name: str) -> GlueTask:
    """Look up a task, failing with the list of valid names rather than a bare KeyError."""
    try:
        return GLUE_TASKS[task_name]
    except KeyError:
        valid = ", ".join(sorted(GLUE_TASKS))
        raise ValueError(f"Unknown GLUE task {task_name!r}; expected one of: {valid}") from None


def glue_metrics(task_name: str, predictions, labels) -> dict[str, float]:
    """Score predictions for a GLUE task on a 0-1 scale.

    `predictions` may be logits (argmax is taken; for stsb an (n, 1) output is
    squeezed) or class ids, so it accepts a Trainer's raw output as-is.
    """
    task = get_glue_task(task_name)
    preds = np.asarray(predictions)
    labels = np.asarray(labels)
    if task.is_regression:
        preds = preds.reshape(-1).astype(float)
    elif preds.ndim == 2:
        preds = preds.argmax(axis=-1)
    if preds.shape[0] != labels.shape[0]:
        raise ValueError(f"Got {preds.shape[0]} predictions but {labels.shape[0]} labels")

    if task.is_regression:
        return {
            "pearson": float(pearsonr(preds, labels)[0]),
            "spearman": float(spearmanr(preds, labels)[0]),
        }
    if task.name == "cola":
        return {"matthews_correlation": float(matthews_corrcoef(labels, preds))}
    scores = {"accuracy": float(accuracy_score(labels, preds))}
    if task.name in ("mrpc", "qqp"):
        scores["f1"] = float(f1_score(labels, preds, pos_label=1, zero_division=0))
    return scores


_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")


def sentences_to_lines(text: str) -> str:
    """Put one sentence per line, as rougeLsum expects.

    Existing newlines are trusted; otherwise split after ., ! or ? followed by
    whitespace. This replaces nltk's sentence tokenizer, whose data is not
    available offline.
    """
    if "\n" in text:
        sentences = text.splitlines()
    else:
        sentences = _SENTENCE_END.split(text)
    return "\n".join(s.strip() for s in sentences if s.strip())


_ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def rouge_metrics(predictions: list[str], references: list[str]) -> dict[str, float]:
    """Mean ROUGE F-measures (x100, as reported in the summarization literature) and mean prediction length."""
    if len(predictions) != len(references):
        raise ValueError(
            f"Got {len(predictions)} predictions but {len(references)} references; they must pair up"
        )
    if not predictions:
        raise ValueError("Cannot compute ROUGE on an empty list of predictions")

    scorer = rouge_scorer.RougeScorer(list(_ROUGE_TYPES), use_stemmer=True)
    totals = dict.fromkeys(_ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, references):
        scores = scorer.score(sentences_to_lines(ref), sentences_to_lines(pred))
        for key in _ROUGE_TYPES:
            totals[key] += scores[key].fmeasure

    n = len(predictions)
    result = {key: 100.0 * total / n for key, total in totals.items()}
    result["gen_len"] = sum(len(p.split()) for p in predictions) / n
    return result
