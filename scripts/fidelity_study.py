"""Does label-free fidelity to the uncut adapter predict what a cut costs, and does it choose a stable size?

For each finished LoRA run at r0 given (the method study's `lora_r64` cells on MiniLM, `lora_r32` on the tiny
LLaMA), with no retraining:

(a) every module cut to rank k (svd, k = 1, 2, 4, ..., r0/2): the validation score lost against the uncut adapter,
    and the fidelity of the cut (top-1 agreement, mean KL) on unlabelled training rows: 256 and 1,000 the run never
    trained on, and the first 256 it trained on (the rows the run scripts measure); per measure and row set, the
    Spearman correlation with the loss over every run and rank, and the error of a linear fit of the loss on the
    measure, each run predicted from the other seeds' runs;
(b) the size each tolerance search chooses (one global budget, svd): by the score on 100 labelled unseen rows
    (0.5 points), and by agreement and KL thresholds on 256 unlabelled rows, unseen or trained on, with the
    validation score it keeps.

    python scripts/fidelity_study.py RUN_DIR [RUN_DIR ...] [--data_dir DIR] [--json OUT.json]

RUN_DIR: a run_glue.py or run_clm.py output folder of `--method lora`. GLUE and GSM8K come from the hub, or from
`--data_dir DIR` (DIR/glue/<task>, DIR/gsm8k), as the run scripts read them.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import math
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa  # noqa: E402

# isort: split

import torch  # noqa: E402
from peft import PeftModel  # noqa: E402
from scipy.stats import pearsonr, spearmanr  # noqa: E402

from lorpa import fidelity  # noqa: E402

UNSEEN_FROM = 1024  # training rows from here on were never trained on (the runs used the first 1,000 or 1,024)
ROW_SETS = {  # unlabelled rows fidelity is measured on: unseen ones, and the first trained ones (the run scripts')
    "256": range(UNSEEN_FROM, UNSEEN_FROM + 256),
    "1000": range(UNSEEN_FROM, UNSEEN_FROM + 1000),
    "trained256": range(256),
}
HELD_OUT = range(UNSEEN_FROM + 1000, UNSEEN_FROM + 1100)  # 100 labelled unseen rows for the labelled criterion
THRESHOLDS = {"agreement": (99.0, 98.0), "kl": (0.001, 0.005)}


def glue_pieces(record: dict, data_dir: str | None):
    """(model loader, validation batches + scorer, unlabelled and labelled held-out training batches)."""
    from datasets import DatasetDict
    from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

    from lorpa.tasks.glue import GlueDataArguments, load_glue, tokenize_glue

    config = record["config"]
    task = record["task"]
    args = GlueDataArguments(task_name=task, data_dir=data_dir, max_seq_length=config.get("max_seq_length", 64))
    splits = load_glue(args)
    tokenizer = AutoTokenizer.from_pretrained(record["model"])
    splits = DatasetDict(train=splits["train"].select(range(HELD_OUT.stop)), validation=splits["validation"])
    encoded = tokenize_glue(splits, tokenizer, args)
    collate = DataCollatorWithPadding(tokenizer)
    spec = args.task

    def batches(dataset, labels: bool):
        rows = [{k: v for k, v in row.items() if labels or k != "label"} for row in dataset]
        return [collate(rows[i:i + 64]) for i in range(0, len(rows), 64)]

    score = score_on(batches(encoded["validation"], True), spec.is_regression)
    train_rows = encoded["train"]
    unlabelled = {name: batches(train_rows.select(rows), False) for name, rows in ROW_SETS.items()}
    held_out = batches(train_rows.select(HELD_OUT), True)

    def load():
        return AutoModelForSequenceClassification.from_pretrained(record["model"], num_labels=spec.num_labels)

    return load, score, unlabelled, score_on(held_out, spec.is_regression)


def score_on(batches, regression: bool):
    """Accuracy (or Pearson) × 100 on labelled batches: the labelled criterion's evaluation."""

    def evaluate(model) -> float:
        predictions, labels = [], []
        with torch.no_grad():
            for batch in batches:
                logits = model(**{k: v for k, v in batch.items() if k != "labels"}).logits
                predictions.append(logits[:, 0] if regression else logits.argmax(-1))
                labels.append(batch["labels"])
        predictions, labels = torch.cat(predictions).double(), torch.cat(labels).double()
        if regression:
            return 100 * pearsonr(predictions.numpy(), labels.numpy())[0]
        return 100 * float((predictions == labels).double().mean())

    return evaluate


def clm_pieces(record: dict, data_dir: str | None):
    """The tiny LLaMA on GSM8K: the score is minus the eval loss on the run's test rows (nats × 100)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lorpa.tasks.clm.data import (
        ClmDataArguments,
        PaddingCollator,
        PromptFormatter,
        encode_split,
        load_prompt_data,
        pad_id,
    )

    config = record["config"]
    known = {f.name for f in dataclasses.fields(ClmDataArguments)}
    args = ClmDataArguments(**{k: v for k, v in config.items() if k in known and k not in (
        "data_dir", "max_train_samples", "eval_dataset_name", "eval_dataset_config_name")}, data_dir=data_dir)
    tokenizer = AutoTokenizer.from_pretrained(config["model_name_or_path"])
    formatter = PromptFormatter(tokenizer, args.prompt_template, args.use_chat_template)
    splits = load_prompt_data(args)
    collate = PaddingCollator(pad_id(tokenizer))

    def batches(dataset, rows: range, training: bool):
        columns = (args.prompt_column, args.response_column) if training else (args.eval_prompt_column,
                                                                               args.eval_response_column)
        features = encode_split(dataset.select(rows), formatter, args, prompt_column=columns[0],
                                response_column=columns[1], source="rows", drop_overlong=True).features
        features = [features[i] for i in range(len(features))]
        return [collate(features[i:i + 16]) for i in range(0, len(features), 16)]

    def mean_loss_score(batches_):
        def score(model) -> float:
            with torch.no_grad():
                return -100 * statistics.fmean(float(model(**batch).loss) for batch in batches_)
        return score

    train = splits["train"]
    unlabelled = {name: batches(train, rows, True) for name, rows in ROW_SETS.items()}
    held_out = batches(train, HELD_OUT, True)

    def load():
        return AutoModelForCausalLM.from_pretrained(config["model_name_or_path"])

    test = batches(splits["validation"], range(len(splits["validation"])), False)
    return load, mean_loss_score(test), unlabelled, mean_loss_score(held_out)


def study_run(run: Path, data_dir: str | None) -> dict:
    record = json.loads((run / "results.json").read_text())
    if record["method"] != "lora":
        raise SystemExit(f"{run}: a --method lora run is needed (the uncut adapter at r0)")
    pieces = clm_pieces if "prompt_template" in record["config"] else glue_pieces
    load, score, unlabelled, held_out_score = pieces(record, data_dir)
    uncut = PeftModel.from_pretrained(load(), run).eval()
    r0 = max(len(scores) for scores in lorpa.rank_scores(uncut, "svd").values())
    reference = {n: fidelity.reference(uncut, batches) for n, batches in unlabelled.items()}
    full = score(uncut)
    cuts = []
    for rank in [2 ** i for i in range(int(math.log2(r0)))]:
        model = copy.deepcopy(uncut)
        lorpa.prune(model, lorpa.PruneOptions(target_rank=rank, score="svd"))
        row = {"rank": rank, "loss": full - score(model)}
        for n, batches in unlabelled.items():
            measured = fidelity.compare(model, batches, reference[n])
            row[f"agreement_{n}"], row[f"kl_{n}"] = measured.agreement, measured.kl_mean
        cuts.append(row)
    regression = reference["256"].regression
    criteria = {"score 0.5 (100 labelled rows)": dict(evaluate=held_out_score, tolerance=0.5)}
    for metric, values in THRESHOLDS.items():
        if metric == "agreement" and regression:
            continue
        for value in values:
            for rows, where in (("256", "256 unseen rows"), ("trained256", "256 trained rows")):
                criteria[f"{metric} {value:g} ({where})"] = dict(tolerance=value, tolerance_metric=metric,
                                                                 batches=unlabelled[rows])
    searches = {}
    for name, arguments in criteria.items():
        model = copy.deepcopy(uncut)
        with torch.no_grad():
            report, search = lorpa.prune_to_tolerance(model, score="svd", **arguments)
        searches[name] = {"total_rank": search.kept, "full_rank": search.full_rank, "loss": full - score(model)}
    return {"run": str(run), "task": record["task"], "seed": record["seed"], "score": full, "cuts": cuts,
            "searches": searches}


def fit_error(points: list[tuple[float, float, int]]) -> float:
    """RMSE of predicting each run's losses from a line fitted on the other seeds' (measure, loss) points."""
    errors = []
    for seed in {s for _, _, s in points}:
        train = [(x, y) for x, y, s in points if s != seed]
        xs, ys = [x for x, _ in train], [y for _, y in train]
        mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in train) / max(sum((x - mean_x) ** 2 for x in xs), 1e-30)
        errors += [(mean_y + slope * (x - mean_x) - y) ** 2 for x, y, s in points if s == seed]
    return math.sqrt(statistics.fmean(errors))


def tables(results: list[dict]) -> str:
    lines = []
    for task in sorted({r["task"] for r in results}):
        runs = [r for r in results if r["task"] == task]
        measures = [k for k in runs[0]["cuts"][0] if k not in ("rank", "loss") and runs[0]["cuts"][0][k] is not None]
        lines += [f"## {task}: {len(runs)} seeds, uncut score {statistics.fmean(r['score'] for r in runs):.2f} "
                  f"± {statistics.stdev(r['score'] for r in runs) if len(runs) > 1 else 0:.2f}", "",
                  "(a) | measure | Spearman with the loss | fit RMSE (points, leave one seed out) |",
                  "|---|---:|---:|"]
        for measure in measures:
            points = [(c[measure], c["loss"], r["seed"]) for r in runs for c in r["cuts"]]
            rho = spearmanr([p[0] for p in points], [p[1] for p in points])[0]
            lines.append(f"| {measure} | {rho:+.3f} | {fit_error(points):.2f} |")
        lines += ["", "| rank | loss (points) | " + " | ".join(measures) + " |",
                  "|---:|---:|" + "---:|" * len(measures)]
        for index, cut in enumerate(runs[0]["cuts"]):
            values = [statistics.fmean(r["cuts"][index][m] for r in runs) for m in measures]
            loss = [r["cuts"][index]["loss"] for r in runs]
            lines.append(f"| {cut['rank']} | {statistics.fmean(loss):.2f} ± {statistics.stdev(loss):.2f} | "
                         + " | ".join(f"{v:.4g}" for v in values) + " |")
        lines += ["", "(b) | criterion | total rank per seed | largest / smallest | loss per seed (points) | "
                      "mean loss |", "|---|---|---:|---|---:|"]
        for name in runs[0]["searches"]:
            chosen = [r["searches"][name]["total_rank"] for r in runs]
            losses = [r["searches"][name]["loss"] for r in runs]
            lines.append(f"| {name} | {', '.join(map(str, chosen))} of {runs[0]['searches'][name]['full_rank']} | "
                         f"{max(chosen) / min(chosen):.1f} | {', '.join(f'{x:+.2f}' for x in losses)} | "
                         f"{statistics.fmean(losses):+.2f} |")
        lines.append("")
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--data_dir", default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write every measurement here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    results = [study_run(run, args.data_dir) for run in args.runs]
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=1))
    print(tables(results))


if __name__ == "__main__":
    main()
