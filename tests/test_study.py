"""Paired differences and prune records of the method study's report, against hand computations."""

import json
import statistics
from types import SimpleNamespace

from lorpa.harness.study import paired_differences, paired_table, prune_table


def run(row, seed, values, folder=None):
    return SimpleNamespace(row=row, seed=seed, values=values, folder=folder, task="sst2")


RUNS = [
    run("LoRA r=8", 1, {"SST-2": 79.0, "STS-B": 71.0}), run("LoRA r=8", 2, {"SST-2": 78.0, "STS-B": 70.0}),
    run("LoRA r=8", 3, {"SST-2": 80.0}),
    run("LoRPA 64→8 (svd)", 1, {"SST-2": 81.5, "STS-B": 74.0}),
    run("LoRPA 64→8 (svd)", 2, {"SST-2": 80.0, "STS-B": 74.5}),
    run("LoRPA 64→8 (svd)", 4, {"SST-2": 99.0}),  # no baseline run with seed 4: not paired
]


def test_differences_are_taken_per_shared_seed():
    result = paired_differences(RUNS, ["LoRA r=8", "LoRPA 64→8 (svd)"], ["SST-2", "STS-B"], "LoRA r=8")
    assert list(result) == ["LoRPA 64→8 (svd)"]
    sst2, stsb = result["LoRPA 64→8 (svd)"]["SST-2"], result["LoRPA 64→8 (svd)"]["STS-B"]
    assert sst2.differences == [2.5, 2.0] and stsb.differences == [3.0, 4.5]
    assert sst2.text(2) == f"+2.25±{statistics.stdev([2.5, 2.0]):.2f}"


def test_a_single_shared_seed_says_so_and_no_baseline_means_no_table():
    runs = [run("A", 1, {"X": 1.0}), run("B", 1, {"X": 0.5})]
    assert paired_differences(runs, ["A", "B"], ["X"], "A")["B"]["X"].text(1) == "-0.5 (n=1)"
    table = SimpleNamespace(runs=runs, columns=["X"])
    assert paired_table(table, ["A", "B"], "missing", 1) == []
    assert paired_table(table, ["A", "B"], "A", 1)[-2] == "| B | -0.5 (n=1) |"


def test_prune_table_averages_the_last_prune_of_each_seed(tmp_path):
    runs = []
    for seed, (error, after) in enumerate([(0.2, 0.80), (0.4, 0.70)], start=1):
        folder = tmp_path / f"seed{seed}"
        folder.mkdir()
        prunes = [{"mean_relative_error": 0.9, "mean_output_error": 0.9, "after": {"accuracy": 0.1}},
                  {"mean_relative_error": error, "mean_output_error": error / 2, "after": {"accuracy": after}}]
        (folder / "results.json").write_text(json.dumps({"prunes": prunes}))
        runs.append(run("LoRPA", seed, {"SST-2": 80.0}, folder))
    table = SimpleNamespace(runs=runs, columns=["SST-2"])
    lines = prune_table(table, ["LoRPA"], lambda metrics, r: {"SST-2": 100 * metrics["accuracy"]}, 1)
    assert lines[-2] == "| LoRPA | 0.300 | 0.150 | 75.0 |"
    assert prune_table(SimpleNamespace(runs=[run("LoRA", 1, {}, tmp_path)], columns=["SST-2"]), ["LoRA"],
                       lambda m, r: {}, 1) == []
