"""run_glue.py end to end on a tiny RoBERTa and synthetic rows in each task's schema."""

import dataclasses
import json

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding

import run_glue
from lorpa.harness.arguments import MethodArguments, ModelArguments
from lorpa.layers import lora_layers
from lorpa.tasks.glue import GlueDataArguments, load_glue
from lorpa.tasks.metrics import GLUE_TASKS, glue_metrics

from conftest import assert_one_line_failure
from tiny_assets import glue_rows, write_jsonl, write_tiny_roberta

RESULT_KEYS = {
    "task", "model", "method", "seed", "metrics", "best_metrics", "trainable_params", "ranks", "stage1_ranks",
    "config", "train_runtime_s",
}


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


def task_files(folder, task, n_train=24, n_eval=8):
    files = {"train_file": write_jsonl(folder / f"{task}-train.jsonl", glue_rows(task, n_train, 0))}
    files["validation_file"] = write_jsonl(folder / f"{task}-validation.jsonl", glue_rows(task, n_eval, 1))
    if task == "mnli":
        files["validation_mismatched_file"] = write_jsonl(folder / "mnli-mm.jsonl", glue_rows(task, n_eval, 2))
    return files


def argv_for(model_dir, folder, task, output_dir, *extra, files=None):
    files = files or task_files(folder, task)
    argv = ["--model_name_or_path", str(model_dir), "--task_name", task, "--output_dir", str(output_dir)]
    for flag, path in files.items():
        argv += [f"--{flag}", str(path)]
    return argv + [
        "--num_train_epochs", "2", "--per_device_train_batch_size", "8", "--learning_rate", "1e-3",
        "--lora_r", "8", "--lora_alpha", "16", "--prune_target_rank", "2", "--report_to", "none",
        "--save_strategy", "no", "--disable_tqdm", "true", *extra,
    ]


def without_target(argv):
    """argv_for's arguments without its --prune_target_rank, for runs that size the adapter another way."""
    index = argv.index("--prune_target_rank")
    return argv[:index] + argv[index + 2:]


def read_results(output_dir):
    return json.loads((output_dir / "results.json").read_text())


@pytest.mark.parametrize("task", list(GLUE_TASKS))
def test_every_task_runs_lorpa_end_to_end(model_dir, tmp_path, task):
    output_dir = tmp_path / "out"
    run_glue.main(argv_for(model_dir, tmp_path, task, output_dir, "--stage1_ratio", "0.5"))
    results = read_results(output_dir)
    assert RESULT_KEYS <= set(results)
    spec = GLUE_TASKS[task]
    main = f"{spec.eval_splits[0]}_{spec.main_metric}" if task == "mnli" else spec.main_metric
    assert main in results["metrics"] and main in results["best_metrics"]
    if task == "mnli":
        assert "validation_mismatched_accuracy" in results["metrics"]
    assert set(results["stage1_ranks"].values()) == {8}
    assert set(results["ranks"].values()) == {2}
    assert [stage["name"] for stage in results["stages"]] == ["stage1", "stage2"]


@pytest.mark.parametrize("method", ["lorpa", "lora", "full", "adalora"])
def test_every_method_trains_the_head_and_reloads(model_dir, tmp_path, method):
    output_dir = tmp_path / "out"
    files = task_files(tmp_path, "rte")
    extra = ["--adalora_target_r", "4"] if method == "adalora" else []
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--method", method, *extra, files=files))
    results = read_results(output_dir)
    assert results["method"] == method and RESULT_KEYS <= set(results)

    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rows = [json.loads(line) for line in files["validation_file"].read_text().splitlines()]
    batch = tokenizer([r["sentence1"] for r in rows], [r["sentence2"] for r in rows], padding=True,
                      return_tensors="pt")
    base = AutoModelForSequenceClassification.from_pretrained(model_dir)
    head_before = base.classifier.out_proj.weight.detach().clone()
    if method == "full":
        reloaded = AutoModelForSequenceClassification.from_pretrained(output_dir)
        assert not torch.equal(reloaded.classifier.out_proj.weight, head_before)
        return
    reloaded = PeftModel.from_pretrained(base, output_dir).eval()
    head = reloaded.base_model.model.classifier.modules_to_save["default"].out_proj.weight
    assert not torch.equal(head, head_before)  # the head was trained and saved
    with torch.no_grad():
        predictions = reloaded(**batch).logits.argmax(-1)
    if method == "adalora":  # update_and_allocate ran: the budget fell from init_r 8 towards target_r 4
        assert sum(results["ranks"].values()) < 8 * len(results["ranks"])
    if method in ("lorpa", "lora"):
        expected_rank = 2 if method == "lorpa" else 8
        assert set(results["ranks"].values()) == {expected_rank}
        assert all(layer.r["default"] == expected_rank for layer in lora_layers(reloaded).values())
    assert predictions.shape == (len(rows),)


def test_reloaded_adapter_reproduces_final_evaluation(model_dir, tmp_path):
    """The reported last-epoch score comes back from the saved adapter alone."""
    output_dir = tmp_path / "out"
    files = task_files(tmp_path, "stsb")
    run_glue.main(argv_for(model_dir, tmp_path, "stsb", output_dir, "--prune_scope", "global", files=files))
    results = read_results(output_dir)
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1)
    reloaded = PeftModel.from_pretrained(base, output_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    rows = [json.loads(line) for line in files["validation_file"].read_text().splitlines()]
    features = [tokenizer(r["sentence1"], r["sentence2"], truncation=True, max_length=128) for r in rows]
    with torch.no_grad():  # one batch padded like the Trainer's collator pads it
        scores = reloaded(**DataCollatorWithPadding(tokenizer)(features)).logits.flatten().tolist()

    expected = glue_metrics("stsb", scores, [r["label"] for r in rows])["pearson"]
    assert results["metrics"]["pearson"] == pytest.approx(expected, abs=1e-6)
    assert sum(results["ranks"].values()) == 2 * len(results["ranks"])


def test_yaml_supplies_defaults_and_flags_override(model_dir, tmp_path):
    files = task_files(tmp_path, "sst2")
    config = tmp_path / "run.yaml"
    config.write_text(
        f"model_name_or_path: {model_dir}\ntask_name: sst2\ntrain_file: {files['train_file']}\n"
        f"validation_file: {files['validation_file']}\nlearning_rate: 4e-4\nlora_r: 8\nprune_target_rank: 4\n"
        "num_train_epochs: 2\nsave_strategy: 'no'\nseed: 7\n"
    )
    output_dir = tmp_path / "out"
    run_glue.main(["--config", str(config), "--output_dir", str(output_dir), "--prune_target_rank", "3"])
    results = read_results(output_dir)
    assert results["config"]["config_file"] == str(config)
    assert results["config"]["training"]["learning_rate"] == 4e-4  # from YAML, string parsed as a float
    assert results["seed"] == 7
    assert set(results["ranks"].values()) == {3}  # the flag beat the YAML value


def test_resume_from_a_stage2_checkpoint(model_dir, tmp_path):
    files = task_files(tmp_path, "rte")
    output_dir = tmp_path / "out"
    argv = argv_for(model_dir, tmp_path, "rte", output_dir, "--save_strategy", "epoch", "--save_total_limit", "3",
                    "--num_train_epochs", "4", "--stage1_ratio", "0.25", files=files)
    run_glue.main(argv)
    complete = read_results(output_dir)
    checkpoints = sorted((output_dir / "stage2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    assert len(checkpoints) == 3
    (output_dir / "results.json").unlink()

    run_glue.main(argv + ["--resume_from_checkpoint", str(checkpoints[0])])
    resumed = read_results(output_dir)
    assert resumed["ranks"] == complete["ranks"]
    assert resumed["stage1_ranks"] == complete["stage1_ranks"]
    assert resumed["metrics"]["accuracy"] == pytest.approx(complete["metrics"]["accuracy"])
    assert resumed["metrics"]["loss"] == pytest.approx(complete["metrics"]["loss"], rel=1e-4)


BAD_INPUTS = {
    "unknown task": (["--task_name", "wnli"], "unknown task 'wnli'"),
    "unknown flag": (["--lora_rank", "8"], "unrecognized argument"),
    "ratio at 1": (["--prune_target_rank", None, "--prune_ratio", "1.0"], "--prune_ratio must be in [0, 1)"),
    "missing file": (["--train_file", "nowhere.jsonl"], "data file not found: nowhere.jsonl"),
    "unknown method": (["--method", "dora"], "unknown method 'dora'"),
    "target above r0": (["--prune_target_rank", "9"], "--prune_target_rank must be in [1, --lora_r=8], got 9"),
    "schedule and target": (["--prune_schedule", "0.1:4"], "--prune_schedule sets the ranks"),
    "schedule syntax": (["--prune_target_rank", None, "--prune_schedule", "0.1-4"], "'0.1-4' is not FRACTION:RANK"),
    "schedule order": (["--prune_target_rank", None, "--prune_schedule", "0.2:4,0.1:2"], "fractions must increase"),
    "schedule ranks": (["--prune_target_rank", None, "--prune_schedule", "0.1:4,0.2:6"], "ranks must decrease"),
    "svd after rewind": (["--prune_score", "svd", "--rewind", "init"], "rewind='init' cannot follow score='svd'"),
    "svd split": (["--svd_split", "left"], "unknown --svd_split 'left'"),
    "stage1 ratio": (["--stage1_ratio", "1.5"], "--stage1_ratio must be in (0, 1]"),
    "stage1 adapter": (["--stage1_adapter", "nowhere"], "--stage1_adapter nowhere: no adapter_config.json"),
    "unknown target module": (["--lora_target_modules", "no_such_module"],
                              "--lora_target_modules no_such_module: no module of the model has that name; "
                              "the model's linear layers: dense, out_proj, key, query, value"),
    "one unknown target among known": (["--lora_target_modules", "query", "no_such_module"],
                                       "--lora_target_modules no_such_module: no module"),
    "unknown module to save": (["--modules_to_save", "no_such_module"], "--modules_to_save no_such_module: no module"),
    "no training rows": (["--max_train_samples", "0"], "--max_train_samples must be a positive number of rows, got 0"),
    "no epochs": (["--num_train_epochs", "0"], "--num_train_epochs must be positive"),
    "missing model folder": (["--model_name_or_path", "/nowhere/model"],
                             "could not load /nowhere/model: no such folder (and it cannot be a hub model id)"),
    "missing file names its flag": (["--validation_file", "nowhere.jsonl"],
                                    "data file not found: nowhere.jsonl (given by --validation_file"),
    "negative learning rate": (["--learning_rate", "-1"], "--learning_rate must be positive, got -1.0"),
    "zero batch size": (["--per_device_train_batch_size", "0"],
                        "--per_device_train_batch_size must be a positive integer, got 0"),
    "zero eval batch size": (["--per_device_eval_batch_size", "0"],
                             "--per_device_eval_batch_size must be a positive integer"),
    "zero accumulation": (["--gradient_accumulation_steps", "0"],
                          "--gradient_accumulation_steps must be a positive integer"),
    "warm-up above 1 as a fraction": (["--warmup_steps", "1.5"],
                                      "--warmup_steps must be a fraction of the steps in [0, 1) or a whole number"),
    "negative weight decay": (["--weight_decay", "-0.1"], "--weight_decay must be >= 0, got -0.1"),
    "beta at 1": (["--adam_beta2", "1.0"], "--adam_beta2 must be in [0, 1), got 1.0"),
    "negative epsilon": (["--adam_epsilon", "-1"], "--adam_epsilon must be >= 0"),
    "negative clipping": (["--max_grad_norm", "-1"], "--max_grad_norm must be >= 0 (0 turns clipping off)"),
    "seed out of range": (["--seed", "-1"], "--seed must be in [0, 2**32), got -1"),
    "label smoothing of 2": (["--label_smoothing_factor", "2"], "--label_smoothing_factor must be in [0, 1)"),
    "negative workers": (["--dataloader_num_workers", "-1"], "--dataloader_num_workers must be >= 0"),
    "dropout above 1": (["--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1), got 1.5"),
    "negative alpha": (["--lora_alpha", "-1"], "--lora_alpha must be positive, got -1.0"),
    "both recoveries": (["--stage2_epochs", "1", "--stage2_steps", "3"],
                        "give --stage2_epochs or --stage2_steps, not both"),
    "no calibration batches": (["--calibration_batches", "0"], "--calibration_batches must be a positive integer"),
    "calibration tokens": (["--calibration_tokens", "all"], "unknown --calibration_tokens 'all'"),
    "global norm": (["--global_norm", "softmax"], "unknown --global_norm 'softmax'"),
    "tolerance without a selection split": (["--prune_target_rank", None, "--prune_tolerance", "0.5",
                                             "--stage1_ratio", "1.0", "--tolerance_metric", "score"],
                                            "--prune_tolerance chooses the budget on held-out rows: "
                                            "add --selection_split_percentage"),
    "tolerance before the end": (["--prune_target_rank", None, "--prune_tolerance", "0.5"],
                                 "--prune_tolerance chooses the cut at the end of training: "
                                 "use it with --stage1_ratio 1.0"),
    "two budgets": (["--prune_energy", "0.9"], "give one of --prune_target_rank, --prune_energy, not several"),
    "energy above 1": (["--prune_target_rank", None, "--prune_energy", "1.2"], "--prune_energy must be in (0, 1]"),
    "energy of magnitude": (["--prune_target_rank", None, "--prune_energy", "0.9"],
                            "energy needs a score whose components carry an energy"),
    "pruned alpha word": (["--pruned_alpha", "folded"], "--pruned_alpha must be a positive number or fold"),
}


def saved_lora_adapter(folder, rank, alpha, rank_pattern=None):
    """A LoRA adapter folder as peft writes it (only its config is read before the run refuses it)."""
    folder.mkdir()
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "rank_pattern": rank_pattern or {},
              "alpha_pattern": {}}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("rank, alpha, pattern, expected", [
    (8, 16, None, "has rank 8 and lora_alpha 16, but --lora_r is 16 and --lora_alpha 32: "
                  "pass the adapter's own values"),
    (16, 16, None, "has rank 16 and lora_alpha 16, but --lora_r is 16 and --lora_alpha 32"),
    (16, 32, {"query": 4, "value": 4}, "was already pruned (ranks 4); give the unpruned LoRA adapter"),
])
def test_a_stage1_adapter_unlike_stage1_is_refused(model_dir, tmp_path, capsys, earlier_output, rank, alpha, pattern,
                                                   expected):
    adapter = saved_lora_adapter(tmp_path / "adapter", rank, alpha, pattern)
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true", "--lora_r", "16",
                    "--lora_alpha", "32", "--stage1_ratio", "1.0", "--stage1_adapter", str(adapter))
    assert_one_line_failure(run_glue.main, argv, expected, capsys, earlier_output)


def test_a_stage1_adapter_with_a_broken_config_is_refused(model_dir, tmp_path, capsys, earlier_output):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text("{not json")
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true",
                    "--stage1_adapter", str(adapter))
    assert_one_line_failure(run_glue.main, argv, "adapter_config.json is not readable JSON", capsys, earlier_output)


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_fails_in_one_line_and_keeps_earlier_output(model_dir, tmp_path, capsys, earlier_output, case):
    override, expected = BAD_INPUTS[case]
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true")
    groups = []  # (flag, values): a value None removes the flag
    for token in override:
        if token is not None and token.startswith("--"):
            groups.append((token, []))
        else:
            groups[-1][1].append(token)
    for flag, values in groups:
        if flag in argv:
            index = argv.index(flag)
            del argv[index : index + 2]
        if values != [None]:
            argv += [flag, *values]
    assert_one_line_failure(run_glue.main, argv, expected, capsys, earlier_output)


def test_non_empty_output_folder_is_refused(model_dir, tmp_path, capsys, earlier_output):
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output)
    assert_one_line_failure(run_glue.main, argv, "is not empty", capsys, earlier_output)


@pytest.mark.parametrize(
    "row, expected",
    [
        ({"sentence1": "good movie", "label": 1, "idx": 0}, "row 3 has no value for 'sentence2'"),
        ({"sentence1": "good", "sentence2": "bad", "label": 2, "idx": 0}, "row 3 has label 2; rte expects a class id"),
    ],
)
def test_malformed_row_is_named(model_dir, tmp_path, capsys, earlier_output, row, expected):
    files = task_files(tmp_path, "rte")
    rows = glue_rows("rte", 2, 0) + [row]
    files["train_file"] = write_jsonl(tmp_path / "bad.jsonl", rows)
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true", files=files)
    assert_one_line_failure(run_glue.main, argv, expected, capsys, earlier_output)


def test_unknown_yaml_key_is_named(model_dir, tmp_path, capsys, earlier_output):
    config = tmp_path / "bad.yaml"
    config.write_text("task_name: rte\nlearning_rat: 1e-3\n")
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--config", str(config))
    assert_one_line_failure(run_glue.main, argv, f"unknown key(s) in {config}: learning_rat", capsys, earlier_output)


@pytest.mark.parametrize("suffix, delimiter", [(".csv", ","), (".tsv", "\t")])
def test_csv_and_tsv_files_load_in_the_glue_schema(tmp_path, suffix, delimiter):
    rows = glue_rows("sst2", 6, 0)
    rows[2]["sentence"] = 'a "quoted" review, with a comma'
    lines = [delimiter.join(["sentence", "label", "idx"])]
    for row in rows:
        text = f'"{row["sentence"].replace(chr(34), chr(34) * 2)}"' if suffix == ".csv" else row["sentence"]
        lines.append(delimiter.join([text, str(row["label"]), str(row["idx"])]))
    for split in ("train", "validation"):
        (tmp_path / f"{split}{suffix}").write_text("\n".join(lines) + "\n")
    args = GlueDataArguments(task_name="sst2", train_file=str(tmp_path / f"train{suffix}"),
                             validation_file=str(tmp_path / f"validation{suffix}"))
    splits = load_glue(args)
    assert splits["train"]["sentence"] == [row["sentence"] for row in rows]
    assert splits["validation"]["label"] == [row["label"] for row in rows]


def test_rewind_init_runs_through_the_script(model_dir, tmp_path):
    output_dir = tmp_path / "out"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--rewind", "init"))
    results = read_results(output_dir)
    assert results["prune"]["rewind"] == "init" and set(results["ranks"].values()) == {2}


def adapter_tensors(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


@pytest.mark.parametrize("extra", [
    ["--prune_score", "sensitivity"],
    ["--prune_score", "magnitude", "--rewind", "init"],
])
def test_a_prune_schedule_gives_the_scheduled_ranks_and_resumes_in_every_stage(model_dir, tmp_path, extra):
    files = task_files(tmp_path, "rte", n_train=32)
    output_dir = tmp_path / "out"
    argv = argv_for(model_dir, tmp_path, "rte", output_dir, "--lora_r", "16", "--lora_alpha", "32",
                    "--prune_schedule", "0.25:8,0.5:4,0.75:2", "--num_train_epochs", "4",
                    "--save_strategy", "epoch", "--save_total_limit", "4", *extra, files=files)
    index = argv.index("--prune_target_rank")
    del argv[index: index + 2]  # the schedule sets the ranks
    run_glue.main(argv)
    complete = read_results(output_dir)
    assert [(s["name"], set(s["ranks"].values())) for s in complete["stages"]] == [
        ("stage1", {16}), ("stage2", {8}), ("stage3", {4}), ("stage4", {2})]
    assert [(p["after_stage"], set(p["ranks"].values())) for p in complete["prunes"]] == [
        ("stage1", {8}), ("stage2", {4}), ("stage3", {2})]
    assert all(0 < p["mean_relative_error"] < 1 or extra[-1] == "init" for p in complete["prunes"])
    assert set(complete["stage1_ranks"].values()) == {16}
    final = adapter_tensors(output_dir)

    for stage in ("stage1", "stage2", "stage3", "stage4"):
        checkpoint = next((output_dir / stage).glob("checkpoint-*"))
        (output_dir / "results.json").unlink()
        run_glue.main(argv + ["--resume_from_checkpoint", str(checkpoint)])
        resumed = read_results(output_dir)
        assert resumed["prunes"] == complete["prunes"], stage
        assert resumed["metrics"] == complete["metrics"], stage
        tensors = adapter_tensors(output_dir)
        assert all(torch.equal(tensors[k], final[k]) for k in final), stage


def test_pruning_late_evaluates_the_pruned_adapter_without_retraining(model_dir, tmp_path):
    output_dir = tmp_path / "out"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--stage1_ratio", "1.0", "--prune_score", "svd"))
    results = read_results(output_dir)
    assert [(s["name"], s["epochs"]) for s in results["stages"]] == [("stage1", 2.0), ("stage2", 0.0)]
    (prune,) = results["prunes"]
    assert results["best_metrics"]["accuracy"] == results["metrics"]["accuracy"] == prune["after"]["accuracy"]
    assert prune["before"]["accuracy"] == results["stages"][0]["history"][-1]["accuracy"]
    assert set(results["ranks"].values()) == {2} and results["prune"]["svd_split"] == "balanced"

    retrained = tmp_path / "retrained"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", retrained, "--stage1_ratio", "1.0", "--stage2_epochs", "1"))
    stages = read_results(retrained)["stages"]
    assert [(s["name"], s["epochs"]) for s in stages] == [("stage1", 2.0), ("stage2", 1.0)]
    assert stages[1]["history"][-1]["step"] > 0


def test_a_trained_lora_adapter_as_stage1_equals_training_stage1_here(model_dir, tmp_path):
    files = task_files(tmp_path, "rte")
    late = tmp_path / "late"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", late, "--stage1_ratio", "1.0", "--prune_score", "svd",
                           files=files))
    lora = tmp_path / "lora"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", lora, "--method", "lora", files=files))
    reused = tmp_path / "reused"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", reused, "--stage1_ratio", "1.0", "--prune_score", "svd",
                           "--stage1_adapter", str(lora), files=files))
    trained, loaded = read_results(late), read_results(reused)
    assert loaded["prunes"] == trained["prunes"]
    assert loaded["stage1_ranks"] == trained["stage1_ranks"] and loaded["metrics"] == trained["metrics"]
    final, reused_final = adapter_tensors(late), adapter_tensors(reused)
    assert all(torch.equal(final[k], reused_final[k]) for k in final)
def test_the_activation_score_calibrates_right_before_the_prune_and_a_short_recovery_follows(model_dir, tmp_path):
    files = task_files(tmp_path, "rte")
    lora = tmp_path / "lora"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", lora, "--method", "lora", files=files))
    output_dir = tmp_path / "activation"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--stage1_ratio", "1.0", "--prune_score",
                           "activation", "--stage1_adapter", str(lora), "--stage2_steps", "2", files=files))
    results = read_results(output_dir)
    (prune,) = results["prunes"]
    assert prune["calibration_tokens"] > 0 and 0 < prune["mean_output_error"] < 1
    report = json.loads((output_dir / "prune_report.json").read_text())
    assert report["score"] == "activation" and all(m["output_error"] is not None for m in report["modules"].values())
    assert [(s["name"], s["history"][-1]["step"]) for s in results["stages"]] == [("stage1", 0), ("stage2", 2)]
    assert results["config"]["stage2_steps"] == 2

    again = tmp_path / "again"  # the calibration reads the training set in order: a second run prunes the same way
    run_glue.main(argv_for(model_dir, tmp_path, "rte", again, "--stage1_ratio", "1.0", "--prune_score", "activation",
                           "--stage1_adapter", str(lora), "--stage2_steps", "2", files=files))
    assert read_results(again)["prunes"] == results["prunes"]

    svd = tmp_path / "svd"  # another score, calibrated on request, reports its output error on the same inputs
    run_glue.main(argv_for(model_dir, tmp_path, "rte", svd, "--stage1_ratio", "1.0", "--prune_score", "svd",
                           "--stage1_adapter", str(lora), "--calibration_batches", "1000", files=files))
    (svd_prune,) = read_results(svd)["prunes"]
    assert svd_prune["calibration_tokens"] == prune["calibration_tokens"]  # every training row, the default's too
    assert svd_prune["mean_output_error"] >= prune["mean_output_error"] - 1e-9
    assert svd_prune["mean_relative_error"] <= prune["mean_relative_error"] + 1e-9


def test_the_tolerance_search_chooses_on_the_selection_split_and_records_every_candidate(model_dir, tmp_path, capsys):
    files = task_files(tmp_path, "rte", n_train=40)
    output_dir = tmp_path / "tolerance"
    run_glue.main(without_target(argv_for(model_dir, tmp_path, "rte", output_dir, "--stage1_ratio", "1.0",
                                          "--prune_score", "svd", "--prune_tolerance", "5",
                                          "--selection_split_percentage", "25", "--pruned_alpha", "fold",
                                          files=files)))
    # 10 selection rows: one row moves accuracy by 10 points, more than the tolerance of 5
    assert "the selection split has 10 rows, so one row moves accuracy by 10.00 points" in capsys.readouterr().err
    results = read_results(output_dir)
    (prune,) = results["prunes"]
    search = prune["tolerance"]
    within = [c for c in search["candidates"] if c["score"] >= search["reference"] - 5]
    assert search["kept"] == min([c["total_rank"] for c in within] + [search["full_rank"]])
    assert sum(results["ranks"].values()) == search["kept"]
    assert (output_dir / "tolerance_curve.png").read_bytes()[:4] == b"\x89PNG"
    config = json.loads((output_dir / "adapter_config.json").read_text())
    assert config["lora_alpha"] == config["r"] == max(results["ranks"].values())  # folded: scaling 1

    energy = tmp_path / "energy"
    run_glue.main(without_target(argv_for(model_dir, tmp_path, "rte", energy, "--stage1_ratio", "1.0",
                                          "--prune_score", "svd", "--prune_energy", "0.9", "--prune_scope", "global",
                                          "--prune_max_rank", "6", files=files)))
    assert max(read_results(energy)["ranks"].values()) <= 6


def test_a_prune_through_the_adapter_files_as_under_fsdp_ends_where_the_prune_in_memory_ends(model_dir, tmp_path,
                                                                                              monkeypatch):
    """Under FSDP (which the Trainer runs on GPUs only) each prune goes through the saved adapter (lorpa.sharded)."""
    files = task_files(tmp_path, "rte")
    extra = ("--prune_score", "svd", "--prune_scope", "global", "--stage1_ratio", "0.5")
    in_memory = tmp_path / "memory"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", in_memory, *extra, files=files))
    monkeypatch.setattr("lorpa.two_stage.prunes_from_files", lambda trainer: True)
    through_files = tmp_path / "files"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", through_files, *extra, files=files))
    memory, sharded = read_results(in_memory), read_results(through_files)
    assert sharded["ranks"] == memory["ranks"] and sharded["prunes"][0]["ranks"] == memory["prunes"][0]["ranks"]
    assert sharded["prunes"][0]["mean_relative_error"] == pytest.approx(memory["prunes"][0]["mean_relative_error"],
                                                                        abs=1e-6)
    assert sharded["metrics"]["accuracy"] == memory["metrics"]["accuracy"]
    assert sharded["metrics"]["loss"] == pytest.approx(memory["metrics"]["loss"], rel=1e-5)
    assert (through_files / "stage1/adapter/adapter_model.safetensors").is_file()

    resumed = tmp_path / "resumed"  # a stage-2 checkpoint of a run pruned through files resumes as any other
    checkpointed = (*extra, "--save_strategy", "epoch", "--save_total_limit", "3")
    run_glue.main(argv_for(model_dir, tmp_path, "rte", resumed, *checkpointed, files=files))
    (checkpoint,) = sorted((resumed / "stage2").glob("checkpoint-*"))[:1]
    (resumed / "results.json").unlink()
    run_glue.main(argv_for(model_dir, tmp_path, "rte", resumed, *checkpointed, "--resume_from_checkpoint",
                           str(checkpoint), files=files))
    assert read_results(resumed)["metrics"]["loss"] == pytest.approx(sharded["metrics"]["loss"], rel=1e-5)


def test_fsdp_refuses_the_options_a_prune_through_files_cannot_honour(model_dir, tmp_path, capsys, earlier_output,
                                                                      monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")  # as `accelerate launch` with an FSDP config sets it
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true", "--prune_score",
                    "activation")
    assert_one_line_failure(run_glue.main, argv, "under FSDP LoRPA prunes the gathered adapter from its files, "
                            "without the model: score 'activation', a calibration", capsys, earlier_output)


def test_a_single_float_label_is_named_by_its_row(model_dir, tmp_path, capsys, earlier_output):
    files = task_files(tmp_path, "rte")
    rows = glue_rows("rte", 8, 0)
    rows[5]["label"] = 1.0  # one float turns the whole parsed column into floats
    files["train_file"] = write_jsonl(tmp_path / "float.jsonl", rows)
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true", files=files)
    assert_one_line_failure(run_glue.main, argv, "float.jsonl: row 6 has label 1.0; rte expects a class id",
                            capsys, earlier_output)


def test_malformed_yaml_gives_line_and_column(model_dir, tmp_path, capsys, earlier_output):
    config = tmp_path / "bad.yaml"
    config.write_text("task_name: rte\nlearning_rate: [1e-3\nlora_r: 8\n")
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--config", str(config))
    assert_one_line_failure(run_glue.main, argv, f"config file {config} is not valid YAML at line 3, column 7",
                            capsys, earlier_output)


def test_results_record_the_users_modules_to_save(model_dir, tmp_path):
    output_dir = tmp_path / "out"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--method", "lora", "--modules_to_save", "dense"))
    results = read_results(output_dir)
    assert results["config"]["modules_to_save"] == ["dense"]  # not peft's list with the head appended


def test_help_puts_config_and_lorpa_flags_first_and_marks_the_trainers(capsys):
    with pytest.raises(SystemExit):
        run_glue.main(["--help"])
    text = capsys.readouterr().out
    usage = text.split("\n\n")[0]
    assert "--model_name_or_path" not in usage and "--task_name" not in usage  # a config can give them
    assert (text.index("--config") < text.index("--method") < text.index("--model_name_or_path")
            < text.index("--output_dir"))
    assert "transformers' Trainer flags" in text[text.index("--adalora_tfinal_ratio"):text.index("--output_dir")]
    options = text.split("\n  -")
    assert not [option for option in options if option.count("default") > 1 and "(default:" in option]
    from lorpa.tasks.summarization import SummarizationDataArguments

    for group in (ModelArguments, GlueDataArguments, MethodArguments, SummarizationDataArguments):
        assert not [f.name for f in dataclasses.fields(group) if not f.metadata.get("help")]


def test_missing_required_flag_is_one_line(tmp_path, capsys, earlier_output):
    argv = ["--task_name", "rte", "--output_dir", str(earlier_output)]
    assert_one_line_failure(run_glue.main, argv, "missing --model_name_or_path: give it on the command line or in the "
                            "--config file", capsys, earlier_output)


def test_no_pin_memory_without_an_accelerator():
    from lorpa.harness.arguments import TRAINING_DEFAULTS

    assert TRAINING_DEFAULTS["dataloader_pin_memory"] is torch.accelerator.is_available()


def test_a_run_prints_no_load_report_and_no_peft_deprecation(model_dir, tmp_path, capfd):
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run_glue.main(argv_for(model_dir, tmp_path, "sst2", tmp_path / "out", "--num_train_epochs", "1"))
    output = capfd.readouterr()
    assert "LOAD REPORT" not in output.out + output.err
    assert "weights new, trained from scratch: classifier.dense.bias" in output.out  # one line instead
    assert not [w for w in caught if "is_gradient_checkpointing" in str(w.message) or "pin_memory" in str(w.message)]


def test_selection_split_chooses_the_epoch_and_reports_the_dev_score_there(model_dir, tmp_path):
    output_dir = tmp_path / "out"
    files = task_files(tmp_path, "rte", n_train=40)
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output_dir, "--method", "lora", "--num_train_epochs", "4",
                           "--selection_split_percentage", "25", "--seed", "3", files=files))
    results = read_results(output_dir)
    history = results["stages"][0]["history"]
    assert [entry["epoch"] for entry in history] == [1.0, 2.0, 3.0, 4.0]
    assert all({"accuracy", "selection_accuracy", "loss", "selection_loss"} <= set(entry) for entry in history)
    chosen = max(history, key=lambda entry: entry["selection_accuracy"])  # the first of equally good epochs
    assert results["selection_metric"] == "selection_accuracy"
    assert results["selected_metrics"] == chosen
    assert results["best_metrics"]["accuracy"] == max(entry["accuracy"] for entry in history)
    # 40 rows: 10 held out, so 30 train at batch 8 -> 4 steps an epoch
    assert history[-1]["step"] == 16
    # the tiny RoBERTa's classification head: dense 32x32 + 32, out_proj 32x2 + 2
    assert results["head_params"] == 32 * 32 + 32 + 32 * 2 + 2
    assert results["trainable_params"] - results["head_params"] == 2 * 2 * 8 * (32 + 32)  # q, v in 2 layers, r=8


def test_selection_split_is_a_seeded_partition_of_the_training_rows(tmp_path):
    from lorpa.tasks.glue import carve_selection_split

    args = GlueDataArguments(task_name="rte", **task_files(tmp_path, "rte", n_train=40))
    splits = load_glue(args)
    first, again, other = (carve_selection_split(splits, 25, seed) for seed in (1, 1, 2))
    assert len(first["selection"]) == 10 and len(first["train"]) == 30
    held_out = list(first["selection"]["idx"])
    assert sorted(list(first["train"]["idx"]) + held_out) == list(range(40))
    assert held_out == list(again["selection"]["idx"]) != list(other["selection"]["idx"])
    assert list(first["validation"]["idx"]) == list(splits["validation"]["idx"])


def test_selection_split_percentage_out_of_range_is_one_line(model_dir, tmp_path, capsys, earlier_output):
    argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--selection_split_percentage", "100")
    assert_one_line_failure(run_glue.main, argv, "--selection_split_percentage must be in (0, 100), got 100", capsys,
                            earlier_output)
