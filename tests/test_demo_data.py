"""The generated demo set must be well-formed, reproducible and need more than keywords."""

import json
import re

import pytest

from lorpa.tasks.demo_data import NEGATIVE_WORDS, POSITIVE_WORDS, main, write_demo_glue

CONTRAST_WORDS = {"but", "although", "though", "yet", "however"}
NEGATORS = {"not", "never", "cannot", "hardly", "far", "anything", "nowhere"}


def tokens(sentence):
    return re.findall(r"[a-z']+", sentence.lower())


def keyword_score(sentence):
    """Positive minus negative sentiment words, blind to negation and sentence structure."""
    words = tokens(sentence)
    return sum(w in POSITIVE_WORDS for w in words) - sum(w in NEGATIVE_WORDS for w in words)


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def splits(tmp_path_factory):
    paths = write_demo_glue(tmp_path_factory.mktemp("demo"))
    return {split: read(path) for split, path in paths.items()}


def test_returns_the_paths_of_both_files(tmp_path):
    paths = write_demo_glue(tmp_path / "out", n_train=10, n_validation=4)
    assert paths == {"train": tmp_path / "out" / "train.jsonl", "validation": tmp_path / "out" / "validation.jsonl"}
    assert [len(read(p)) for p in paths.values()] == [10, 4]


def test_rows_follow_the_sst2_schema(splits):
    assert [len(rows) for rows in splits.values()] == [2000, 400]
    for rows in splits.values():
        for i, row in enumerate(rows):
            assert list(row) == ["sentence", "label", "idx"]
            assert type(row["sentence"]) is str and row["sentence"] == row["sentence"].strip() != ""
            assert type(row["label"]) is int and row["label"] in (0, 1)
            assert type(row["idx"]) is int and row["idx"] == i


def test_same_seed_same_bytes_other_seed_other_data(tmp_path):
    a = write_demo_glue(tmp_path / "a", n_train=50, n_validation=20, seed=3)
    b = write_demo_glue(tmp_path / "b", n_train=50, n_validation=20, seed=3)
    c = write_demo_glue(tmp_path / "c", n_train=50, n_validation=20, seed=4)
    for split in ("train", "validation"):
        assert a[split].read_bytes() == b[split].read_bytes()
        assert a[split].read_bytes() != c[split].read_bytes()


@pytest.mark.parametrize("size", [7, 400])
def test_labels_are_balanced(tmp_path, size):
    rows = read(write_demo_glue(tmp_path, n_train=size, n_validation=1)["train"])
    assert abs(sum(r["label"] for r in rows) * 2 - size) <= 1


def test_splits_are_disjoint_and_sentences_unique(splits):
    train = [r["sentence"] for r in splits["train"]]
    validation = [r["sentence"] for r in splits["validation"]]
    assert len(set(train)) == len(train) and len(set(validation)) == len(validation)
    assert not set(train) & set(validation)


def test_negation_flips_the_sentiment_word(splits):
    # Sentences without a contrast and with a single sentiment word: the label is that
    # word's polarity, flipped exactly when "not"/"n't" is present.
    negated, plain = [], []
    for row in splits["train"]:
        words = tokens(row["sentence"])
        if CONTRAST_WORDS & set(words) or sum(w in POSITIVE_WORDS or w in NEGATIVE_WORDS for w in words) != 1:
            continue
        word_label = int(keyword_score(row["sentence"]) > 0)
        if "not" in words or any(w.endswith("n't") for w in words):
            negated.append((word_label, row["label"]))
        elif not NEGATORS & set(words):
            plain.append((word_label, row["label"]))
    assert {label for _, label in negated} == {0, 1} and len(negated) >= 50
    assert all(word_label != label for word_label, label in negated)
    assert all(word_label == label for word_label, label in plain) and len(plain) >= 200


def test_keyword_baseline_is_above_chance_but_far_from_solving_it(splits):
    rows = splits["validation"]
    accuracy = sum(int(keyword_score(r["sentence"]) >= 0) == r["label"] for r in rows) / len(rows)
    assert 0.55 < accuracy < 0.8


def test_cli_writes_files_and_prints_paths(tmp_path, capsys):
    main([str(tmp_path), "--n_train", "6", "--n_validation", "2", "--seed", "1"])
    printed = capsys.readouterr().out.split()
    assert printed == [str(tmp_path / "train.jsonl"), str(tmp_path / "validation.jsonl")]
    assert len(read(tmp_path / "validation.jsonl")) == 2
