"""Nothing non-finite gets through, configs are read as peft reads them, every output path is checked first, a
killed prune leaves no litter, and the run scripts do what the docs say (a budget flag over a config's budget, the
early refusal, a diverged run, --merge_final everywhere). Each bad input: one line, a non-zero exit, earlier
outputs byte-identical."""

import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification, LlamaConfig, LlamaForCausalLM

import run_glue
from lorpa.cli import run_cli
from lorpa.commands import main as lorpa_main
from test_run_glue import argv_for, model_dir, read_results, task_files  # noqa: F401  (model_dir: a fixture)

import processes
from conftest import assert_one_line_failure

ROOT = Path(__file__).resolve().parents[1]


def tiny_llama_lora(r=8, seed=1, **config):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    torch.manual_seed(seed)
    lora = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules="all-linear", **config)
    return get_peft_model(base, lora)


@pytest.fixture
def adapter(tmp_path):
    folder = tmp_path / "adapter"
    tiny_llama_lora().save_pretrained(folder)
    return folder


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def refused(argv, expected, capsys, *untouched):
    """`lorpa ARGV` refuses in one line naming the problem, and every folder in `untouched` stays byte-identical."""
    before = [snapshot(folder) for folder in untouched]
    assert run_cli(lorpa_main, argv) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert [snapshot(folder) for folder in untouched] == before


@pytest.mark.parametrize("argv, expected", [
    (["--target_rank", "4", "--alpha", "nan"], "alpha must be a finite number, got nan"),
    (["--target_rank", "4", "--alpha", "inf"], "alpha must be a finite number, got inf"),
    (["--target_rank", "4", "--alpha", "-2"], "alpha must be 'keep_scaling', 'fold' or a positive number"),
    (["--tolerance", "nan", "--evaluate", "echo 1"], "tolerance must be a finite number, got nan"),
    (["--energy", "inf", "--score", "svd"], "energy must be a finite number, got inf"),
    (["--tolerance", "0.5", "--scope", "module", "--evaluate", "echo 1"],
     "tolerance searches one budget over all modules: use it with scope='global'"),
    (["--tolerance", "0.5", "--evaluate", "echo score nan"], "--evaluate printed nan for"),
])
def test_non_finite_numbers_and_a_module_scope_search_are_refused(adapter, tmp_path, capsys, argv, expected):
    earlier = tmp_path / "out"
    earlier.mkdir()
    (earlier / "results.json").write_text('{"earlier": true}')
    refused(["prune", str(adapter), str(earlier), "--overwrite", *argv], expected, capsys, adapter, earlier)


def rewrite_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def test_a_config_without_lora_alpha_is_read_with_peft_s_default(adapter, tmp_path, capsys):
    rewrite_config(adapter, lora_alpha=None)
    assert run_cli(lorpa_main, ["prune", str(adapter), str(tmp_path / "out"), "--target_rank", "4"]) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert {m["old_alpha"] for m in report["modules"].values()} == {LoraConfig().lora_alpha} == {8}
    assert run_cli(lorpa_main, ["inspect", str(adapter), "--json"]) == 0
    reloaded = PeftModel.from_pretrained(tiny_llama_lora().get_base_model(), adapter)  # what peft does with it
    assert {layer.lora_alpha["default"] for layer in reloaded.modules() if hasattr(layer, "lora_alpha")
            and isinstance(layer.lora_alpha, dict) and "default" in layer.lora_alpha} == {8}


@pytest.mark.parametrize("command", ["prune", "inspect", "check"])
def test_a_string_alpha_is_one_line_in_every_tool(adapter, tmp_path, capsys, command):
    rewrite_config(adapter, lora_alpha="16")
    argv = [command, str(adapter)] + (["out", "--target_rank", "4"] if command == "prune" else [])
    refused(argv, "lora_alpha must be a finite number, as peft needs it, got '16'", capsys, adapter)


@pytest.mark.parametrize("score", ["svd", "magnitude", "random"])
def test_a_nan_tensor_is_refused_by_every_score_and_named(adapter, tmp_path, capsys, score):
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    key = next(k for k in sorted(tensors) if k.endswith("mlp.up_proj.lora_B.weight"))
    tensors[key][3, 1] = float("nan")
    save_file(tensors, path, metadata={"format": "pt"})
    refused(["prune", str(adapter), str(tmp_path / "out"), "--target_rank", "4", "--score", score],
            "model.layers.0.mlp.up_proj: lora_B hold NaN or infinite values", capsys, adapter)
    assert not (tmp_path / "out").exists()
    assert run_cli(lorpa_main, ["inspect", str(adapter)]) == 1  # a finding, not a crash
    out = capsys.readouterr()
    assert "DAMAGED: model.layers.0.mlp.up_proj: lora_B hold NaN" in out.out and out.err == ""


def test_inspect_plot_to_a_folder_or_an_unwritable_place_is_refused_before_reading(adapter, tmp_path, capsys):
    refused(["inspect", str(adapter), "--plot", str(tmp_path)], "is a folder; give the path of a file", capsys,
            adapter)
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):  # root writes to any folder but a kernel one
            locked = Path("/proc/sys")
        if os.access(locked, os.W_OK):
            pytest.skip("no folder here refuses this user's writes")
        refused(["inspect", str(adapter), "--plot", str(locked / "x.png")], "not writable here", capsys, adapter)
    finally:
        (tmp_path / "locked").chmod(0o700)


def test_report_out_and_curve_are_checked_before_the_runs_are_read(tmp_path, capsys):
    (tmp_path / "runs").mkdir()
    (tmp_path / "file").write_text("")
    refused(["report", str(tmp_path / "runs"), "--curve", str(tmp_path)], "--curve", capsys)
    refused(["report", str(tmp_path / "runs"), "--out", str(tmp_path / "file" / "summary")], "is a file", capsys)


def big_adapter(folder: Path, r=256, width=2048, modules=8) -> Path:
    """An adapter large enough (about 130 MB) that writing it takes long enough to be killed in the middle."""
    generator = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(modules):
        prefix = f"base_model.model.model.layers.{i}.mlp.up_proj"
        tensors[f"{prefix}.lora_A.weight"] = torch.randn(r, width, generator=generator)
        tensors[f"{prefix}.lora_B.weight"] = torch.randn(width, r, generator=generator)
    folder.mkdir()
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {"peft_type": "LORA", "r": r, "lora_alpha": r, "target_modules": ["up_proj"]}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    return folder


def test_a_prune_killed_while_writing_leaves_input_and_a_whole_or_no_output_and_no_litter(tmp_path):
    source = big_adapter(tmp_path / "adapter")
    before = snapshot(source)
    output = tmp_path / "out"
    command = [sys.executable, "-m", "lorpa.prune_adapter", str(source), str(output), "--target_rank", "128",
               "--score", "magnitude"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    process = processes.start(command, env=env, cwd=ROOT)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and process.poll() is None:
            written = list(tmp_path.glob(".out.lorpa-*/adapter_model.safetensors"))
            if written and written[0].stat().st_size > 0:
                os.kill(process.pid, signal.SIGKILL)
                break
            time.sleep(0.002)
        process.wait(timeout=60)
    finally:
        if process.poll() is None:
            processes.kill_tree(process)
    assert process.returncode == -signal.SIGKILL, "the prune finished before it could be killed while writing"
    assert snapshot(source) == before
    assert not output.exists()
    assert [p.name for p in tmp_path.glob(".out.lorpa-*")]  # the killed run's staging folder, until the next run
    done = processes.run(command, timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]  # the next run on it removed the litter
    pruned, original = (load_file(folder / "adapter_model.safetensors") for folder in (output, source))
    assert pruned.keys() == original.keys()


def test_a_budget_flag_replaces_the_config_s_budget(model_dir, tmp_path, capsys):  # noqa: F811
    files = task_files(tmp_path, "rte")
    argv = argv_for(model_dir, tmp_path, "rte", tmp_path / "out", "--stage1_ratio", "1.0", files=files)
    index = argv.index("--prune_target_rank")
    config = {"prune_target_rank": 2, "prune_score": "svd", "prune_scope": "global"}
    (tmp_path / "cell.yaml").write_text(yaml.safe_dump(config))
    run_glue.main(argv[:index] + argv[index + 2:] + ["--config", str(tmp_path / "cell.yaml"), "--prune_energy", "0.6"])
    assert f"--prune_energy replaces {tmp_path / 'cell.yaml'}'s prune_target_rank: 2" in capsys.readouterr().out
    record = read_results(tmp_path / "out")
    assert record["config"]["prune_energy"] == 0.6 and record["config"]["prune_target_rank"] is None
    assert record["config"]["prune_score"] == "svd" and set(record["ranks"].values()) != {2}  # not the config's 2


def test_a_bad_score_is_refused_before_any_data_or_weight_is_read(tmp_path, capsys, earlier_output):
    """The model folder does not exist: a refusal that named it would have come from loading."""
    argv = argv_for(tmp_path / "no-model", tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true",
                    "--prune_score", "bogus")
    assert_one_line_failure(run_glue.main, argv, "unknown --prune_score 'bogus'", capsys, earlier_output)


def test_non_finite_flags_are_refused(model_dir, tmp_path, capsys, earlier_output):  # noqa: F811
    for flag, value, expected in (("--pruned_alpha", "nan", "--pruned_alpha must be a positive number or fold"),
                                  ("--stage1_ratio", "nan", "--stage1_ratio must be a finite number, got nan"),
                                  ("--adam_beta1", "inf", "--adam_beta1 must be a finite number, got inf")):
        argv = argv_for(model_dir, tmp_path, "rte", earlier_output, "--overwrite_output_dir", "true", flag, value)
        assert_one_line_failure(run_glue.main, argv, expected, capsys, earlier_output)


def test_a_diverged_run_stops_in_one_line_and_writes_no_results(model_dir, tmp_path, capsys):  # noqa: F811
    output = tmp_path / "out"
    argv = argv_for(model_dir, tmp_path, "rte", output, "--learning_rate", "1e30", "--max_grad_norm", "0",
                    "--save_strategy", "epoch", "--num_train_epochs", "3", "--stage1_ratio", "1.0")
    assert run_glue.run_cli(run_glue.main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and "stage1, step" in errors[0] and "the run diverged" in errors[0]
    assert not (output / "results.json").exists()


def test_merge_final_writes_a_merged_model_from_run_glue(model_dir, tmp_path):  # noqa: F811
    output = tmp_path / "out"
    run_glue.main(argv_for(model_dir, tmp_path, "rte", output, "--stage1_ratio", "1.0", "--merge_final", "true"))
    merged = AutoModelForSequenceClassification.from_pretrained(output / "merged").eval()
    base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=2)
    adapted = PeftModel.from_pretrained(base, output).eval()
    inputs = {"input_ids": torch.tensor([[0, 5, 7, 9, 2]])}
    with torch.no_grad():
        assert torch.allclose(merged(**inputs).logits, adapted(**inputs).logits, atol=1e-5)
    assert "# A LoRA adapter pruned with LoRPA" in (output / "README.md").read_text()


@pytest.mark.parametrize("argv, expected", [
    (["--tolerance", "150", "--tolerance_metric", "agreement"], "a percentage, at most 100, got 150"),
    (["--target_rank", "4", "--tolerance_metric", "kl"], "tolerance_metric says what a tolerance search holds"),
    (["--tolerance", "0.1", "--tolerance_metric", "bogus"], "unknown tolerance_metric 'bogus'"),
    (["--tolerance", "99"], "--tolerance needs --evaluate COMMAND (a labelled score), or --base_model and"),
    (["--target_rank", "4", "--base_model", "x"], "--base_model and --calibration_data go together"),
])
def test_bad_thresholds_and_fidelity_flags_are_one_line(adapter, tmp_path, capsys, argv, expected):
    refused(["prune", str(adapter), str(tmp_path / "out"), *argv], expected, capsys, adapter)
