"""Metrics checked against values worked out by hand, not against the libraries themselves."""

import math

import numpy as np
import pytest

from lorpa.tasks.metrics import (
    GLUE_TASKS,
    GlueTask,
    get_glue_task,
    glue_metrics,
    rouge_metrics,
    sentences_to_lines,
)

# Shared binary example: TP=2, FP=1, FN=2, TN=3 (positive class = 1).
BIN_LABELS = [1, 1, 1, 1, 0, 0, 0, 0]
BIN_PREDS = [1, 1, 0, 0, 1, 0, 0, 0]


# --------------------------------------------------------------------------- GLUE


def test_task_table():
    assert set(GLUE_TASKS) == {"cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte"}
    assert GLUE_TASKS["mnli"].eval_splits == ("validation_matched", "validation_mismatched")
    assert GLUE_TASKS["mnli"].num_labels == 3
    assert GLUE_TASKS["qqp"].text_columns == ("question1", "question2")
    assert GLUE_TASKS["qnli"].text_columns == ("question", "sentence")
    assert GLUE_TASKS["sst2"].text_columns == ("sentence",)
    assert [t for t, spec in GLUE_TASKS.items() if spec.is_regression] == ["stsb"]
    assert GLUE_TASKS["stsb"].num_labels == 1
    assert all(spec.eval_splits == ("validation",) for t, spec in GLUE_TASKS.items() if t != "mnli")
    with pytest.raises(AttributeError):  # frozen
        GLUE_TASKS["cola"].num_labels = 5  # type: ignore[misc]
    assert isinstance(get_glue_task("rte"), GlueTask)


@pytest.mark.parametrize("task", sorted(GLUE_TASKS))
def test_main_metric_is_reported(task):
    labels = [0.0, 1.0, 2.5, 5.0] if task == "stsb" else [0, 1, 1, 0]
    preds = [0.5, 1.0, 2.0, 4.0] if task == "stsb" else [0, 1, 0, 0]
    scores = glue_metrics(task, preds, labels)
    assert GLUE_TASKS[task].main_metric in scores
    assert all(type(v) is float for v in scores.values())


def test_cola_matthews_hand_computed():
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN))
    #     = (2*3 - 1*2) / sqrt(3*4*4*5) = 4 / sqrt(240) = 1 / sqrt(15)
    scores = glue_metrics("cola", BIN_PREDS, BIN_LABELS)
    assert scores.keys() == {"matthews_correlation"}
    assert scores["matthews_correlation"] == pytest.approx(1 / math.sqrt(15))


@pytest.mark.parametrize("task", ["mrpc", "qqp"])
def test_accuracy_and_f1_hand_computed(task):
    # accuracy = (TP+TN)/n = 5/8; precision = 2/3, recall = 2/4,
    # F1 = 2TP / (2TP + FP + FN) = 4 / 7
    scores = glue_metrics(task, BIN_PREDS, BIN_LABELS)
    assert scores == pytest.approx({"accuracy": 5 / 8, "f1": 4 / 7})


def test_f1_is_for_positive_class_one():
    # Swapping which class is "positive" changes F1: for class 0 it would be
    # 2*3 / (2*3 + 2 + 1) = 2/3; we must report class 1's 4/7.
    assert glue_metrics("mrpc", BIN_PREDS, BIN_LABELS)["f1"] == pytest.approx(4 / 7)
    flipped = glue_metrics("mrpc", [1 - p for p in BIN_PREDS], [1 - y for y in BIN_LABELS])
    assert flipped["f1"] == pytest.approx(2 / 3)


@pytest.mark.parametrize("task", ["sst2", "qnli", "rte"])
def test_accuracy_only_tasks(task):
    assert glue_metrics(task, BIN_PREDS, BIN_LABELS) == {"accuracy": 5 / 8}


def test_argmax_over_logits_mnli():
    logits = np.array(
        [
            [2.0, 0.1, -1.0],  # -> 0
            [0.0, 3.0, 1.0],  # -> 1
            [-1.0, 0.5, 0.6],  # -> 2
            [5.0, 4.9, 0.0],  # -> 0
            [0.2, 0.1, 0.3],  # -> 2
        ]
    )
    labels = [0, 1, 2, 1, 1]  # argmax matches the first three: 3/5
    assert glue_metrics("mnli", logits, labels) == {"accuracy": pytest.approx(3 / 5)}


def test_binary_logits_same_as_class_ids():
    logits = np.array([[0.0, 1.0] if p else [1.0, 0.0] for p in BIN_PREDS])
    assert glue_metrics("cola", logits, BIN_LABELS) == glue_metrics("cola", BIN_PREDS, BIN_LABELS)


def test_stsb_pearson_hand_computed():
    # x = [1,2,3,4], y = [1,3,2,4]; both means 2.5.
    # dx = [-1.5,-.5,.5,1.5], dy = [-1.5,.5,-.5,1.5]
    # sum(dx*dy) = 2.25 - .25 - .25 + 2.25 = 4; sum(dx^2) = sum(dy^2) = 5  ->  r = 4/5.
    # No ties, so Spearman equals Pearson on the (identical) ranks: 4/5.
    scores = glue_metrics("stsb", [1.0, 2.0, 3.0, 4.0], [1.0, 3.0, 2.0, 4.0])
    assert scores == pytest.approx({"pearson": 0.8, "spearman": 0.8})


def test_stsb_perfectly_linear():
    labels = np.array([0.0, 1.5, 2.0, 4.5, 5.0])
    scores = glue_metrics("stsb", 2 * labels - 3, labels)
    assert scores == pytest.approx({"pearson": 1.0, "spearman": 1.0})


def test_stsb_spearman_with_ties_and_column_logits():
    # preds [1,2,2,10] -> ranks [1,2.5,2.5,4]; labels [1,2,3,4] -> ranks [1,2,3,4].
    # Rank deviations (mean 2.5): [-1.5,0,0,1.5] and [-1.5,-.5,.5,1.5]
    # rho = 4.5 / sqrt(4.5 * 5) = sqrt(0.9).
    # Pearson on raw values: mean(preds) = 3.75, dx = [-2.75,-1.75,-1.75,6.25]
    # sum(dx*dy) = 4.125 + .875 - .875 + 9.375 = 13.5; sum(dx^2) = 52.75
    # r = 13.5 / sqrt(52.75 * 5).
    preds = np.array([[1.0], [2.0], [2.0], [10.0]])  # (n, 1) regression head output
    scores = glue_metrics("stsb", preds, [1.0, 2.0, 3.0, 4.0])
    assert scores["spearman"] == pytest.approx(math.sqrt(0.9))
    assert scores["pearson"] == pytest.approx(13.5 / math.sqrt(52.75 * 5))


def test_unknown_task_lists_valid_ones():
    with pytest.raises(ValueError, match=r"'wnli'.*cola.*stsb"):
        glue_metrics("wnli", [0], [0])


def test_glue_length_mismatch():
    with pytest.raises(ValueError, match="3 predictions but 2 labels"):
        glue_metrics("sst2", [0, 1, 1], [0, 1])


# --------------------------------------------------------------------------- ROUGE


def test_sentences_to_lines():
    assert sentences_to_lines("Hi there. How are you?  Fine! Pi is 3.14 ok") == (
        "Hi there.\nHow are you?\nFine!\nPi is 3.14 ok"
    )
    # Existing newlines win over punctuation; blank lines are dropped.
    assert sentences_to_lines("a. b\n\n  c d  \n") == "a. b\nc d"


def test_rouge_hand_computed():
    # ref : the cat sat on the mat                (6 tokens)
    # pred: on the mat the cat sat quietly        (7 tokens)
    # ROUGE-1: clipped overlap the*2, cat, sat, on, mat = 6 -> F = 2*6/(6+7) = 12/13
    # ROUGE-2: ref bigrams {the cat, cat sat, sat on, on the, the mat} (5),
    #          pred {on the, the mat, mat the, the cat, cat sat, sat quietly} (6),
    #          overlap 4 -> F = 2*4/(5+6) = 8/11
    # ROUGE-L: LCS = "the cat sat" (or "on the mat") = 3 -> F = 2*3/13 = 6/13
    scores = rouge_metrics(["on the mat the cat sat quietly"], ["the cat sat on the mat"])
    assert scores["rouge1"] == pytest.approx(100 * 12 / 13)
    assert scores["rouge2"] == pytest.approx(100 * 8 / 11)
    assert scores["rougeL"] == pytest.approx(100 * 6 / 13)
    assert scores["gen_len"] == 7


def test_rouge_uses_stemmer():
    # Porter stemming maps cats->cat, running->run, runs->run, so all tokens match.
    scores = rouge_metrics(["cats running"], ["cat runs"])
    assert scores["rouge1"] == pytest.approx(100.0)
    assert scores["rouge2"] == pytest.approx(100.0)


def test_rouge_lsum_differs_from_rouge_l():
    # ref sentences r1 = "the cat sat", r2 = "the dog ran"
    # pred sentences c1 = "the dog ran", c2 = "the cat slept"
    # ROUGE-L over the whole text: LCS("the cat sat the dog ran",
    #   "the dog ran the cat slept") = 3 ("the dog ran") -> F = 2*3/12 = 1/2
    # ROUGE-Lsum: per reference sentence, union of LCS hits with every pred
    #   sentence: r1 -> {the, cat} (from c2) = 2, r2 -> {the, dog, ran} = 3
    #   -> hits 5, P = R = 5/6 -> F = 5/6
    scores = rouge_metrics(["The dog ran. The cat slept."], ["The cat sat. The dog ran."])
    assert scores["rougeL"] == pytest.approx(100 / 2)
    assert scores["rougeLsum"] == pytest.approx(100 * 5 / 6)


def test_rouge_mean_and_scaling():
    # One perfect pair (F = 1) and one with no overlap (F = 0): mean 0.5 -> 50.
    scores = rouge_metrics(["the cat sat", "xyz"], ["the cat sat", "abc"])
    assert scores == pytest.approx(
        {"rouge1": 50.0, "rouge2": 50.0, "rougeL": 50.0, "rougeLsum": 50.0, "gen_len": 2.0}
    )


def test_rouge_input_errors():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        rouge_metrics(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="empty"):
        rouge_metrics([], [])


# --------------------------------------------------------------------------- Hugging Face `evaluate`


def _evaluate_metric(*args):
    """An `evaluate` metric, or a skip: the library is optional and loads its metric code from the hub."""
    evaluate = pytest.importorskip("evaluate")
    try:
        return evaluate.load(*args)
    except Exception as error:  # offline: connection or file-not-found errors of several types
        pytest.skip(f"evaluate.load{args} is unavailable here: {type(error).__name__}")


@pytest.mark.parametrize("task", ["cola", "mrpc", "stsb"])
def test_glue_scores_equal_evaluates(task):
    metric = _evaluate_metric("glue", task)
    labels = [0.5, 4.0, 2.5, 3.0, 1.0, 5.0] if task == "stsb" else BIN_LABELS
    predictions = [1.0, 3.5, 2.0, 3.5, 0.5, 4.0] if task == "stsb" else BIN_PREDS
    theirs = metric.compute(predictions=predictions, references=labels)
    ours = glue_metrics(task, predictions, labels)
    for key, value in theirs.items():
        key = {"pearson": "pearson", "spearmanr": "spearman"}.get(key, key)
        if key in ours:
            assert ours[key] == pytest.approx(value)


def test_rouge_equals_evaluates():
    metric = _evaluate_metric("rouge")
    predictions = ["on the mat the cat sat quietly", "Dogs were running.\nThey barked."]
    references = ["the cat sat on the mat", "The dog runs.\nIt barks loudly."]
    theirs = metric.compute(predictions=predictions, references=references, use_stemmer=True)
    ours = rouge_metrics(predictions, references)
    for key in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert ours[key] == pytest.approx(100 * theirs[key])
