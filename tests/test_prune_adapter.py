"""`python -m lorpa.prune_adapter` on saved adapters gives exactly what `lorpa.prune` gives in memory."""

import json
import sys
from pathlib import Path

import pytest
import torch
from peft import AdaLoraConfig, IA3Config, LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorpa
import lorpa.adapter_files
import lorpa.prune_adapter
from lorpa.cli import run_cli
from lorpa.prune_adapter import main

import processes
from conftest import tiny_roberta


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(config).eval()


MODELS = {"roberta": (tiny_roberta, "SEQ_CLS"), "llama": (tiny_llama, "CAUSAL_LM")}
BATCH = {"input_ids": torch.randint(3, 120, (2, 9), generator=torch.Generator().manual_seed(2))}


def save_adapter(path, arch="llama", r=16, dtype=None, safe_serialization=True, **config):
    """A saved all-linear LoRA adapter with random A and B (every component matters)."""
    build, task_type = MODELS[arch]
    torch.manual_seed(1)
    config = {"target_modules": "all-linear", **config}
    model = get_peft_model(build(), LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, task_type=task_type,
                                               **config))
    if dtype is not None:
        model.to(dtype)
    model.save_pretrained(path, safe_serialization=safe_serialization)
    return path


def logits(model):
    with torch.no_grad():
        return model(**BATCH).logits


def assert_matches_in_memory(arch, adapter, output, argv, prune_kwargs):
    """Output of the command == the adapter loaded with peft, pruned by `lorpa.prune`, in every tensor. The command's
    default score is svd (no retraining follows a cut of saved files)."""
    assert run_cli(main, [str(adapter), str(output), *argv]) == 0
    build = MODELS[arch][0]
    expected = PeftModel.from_pretrained(build(), adapter).eval()
    report = lorpa.prune(expected, **{"score": "svd", **prune_kwargs})
    pruned = PeftModel.from_pretrained(build(), output).eval()

    expected_state, pruned_state = expected.state_dict(), pruned.state_dict()
    assert expected_state.keys() == pruned_state.keys()
    assert any("lora_A" in key for key in pruned_state)
    for key, tensor in expected_state.items():
        assert torch.equal(pruned_state[key], tensor), key
    assert torch.equal(logits(pruned), logits(expected))
    assert json.loads((output / "prune_report.json").read_text()) == json.loads(json.dumps(report.to_dict()))
    saved, live = json.loads((output / "adapter_config.json").read_text()), expected.peft_config["default"]
    for key in ("r", "rank_pattern", "alpha_pattern"):
        assert saved[key] == getattr(live, key), key
    assert saved["lora_alpha"] == live.lora_alpha  # unused (alpha_pattern names every module), yet the same
    lengths = [len(name) for name in saved["rank_pattern"]]
    assert lengths == sorted(lengths, reverse=True)  # longest first, so no key captures a longer name
    return report


@pytest.mark.parametrize("arch", MODELS)
@pytest.mark.parametrize("scope", ["module", "global"])
@pytest.mark.parametrize("argv, kwargs", [(["--target_rank", "5"], {"target_rank": 5}),
                                          (["--ratio", "0.75"], {"ratio": 0.75})])
@pytest.mark.parametrize("score", [None, "magnitude"])
def test_pruning_saved_adapter_equals_pruning_loaded_model(tmp_path, arch, scope, argv, kwargs, score):
    adapter = save_adapter(tmp_path / "adapter", arch)
    argv, kwargs = (argv, kwargs) if score is None else ([*argv, "--score", score], dict(kwargs, score=score))
    report = assert_matches_in_memory(arch, adapter, tmp_path / "out", [*argv, "--scope", scope],
                                      dict(kwargs, scope=scope))
    assert len(report.modules) == (14 if arch == "llama" else 12)
    assert (len(set(report.ranks.values())) > 1) == (scope == "global")


@pytest.mark.parametrize(
    "arch, config, argv, kwargs",
    [
        ("llama", {}, ["--ratio", "0.5", "--score", "random", "--seed", "3"],
         {"ratio": 0.5, "score": "random", "seed": 3}),
        ("llama", {}, ["--target_rank", "3", "--alpha", "8"], {"target_rank": 3, "alpha": 8}),
        ("llama", {"use_rslora": True, "rank_pattern": {"q_proj": 12}, "alpha_pattern": {"v_proj": 5}},
         ["--target_rank", "4", "--scope", "global", "--min_rank", "2"],
         {"target_rank": 4, "scope": "global", "min_rank": 2}),
        ("llama", {"lora_bias": True}, ["--target_rank", "6"], {"target_rank": 6}),
        ("roberta", {"target_modules": ["query", "value"]}, ["--target_rank", "4", "--score", "elementwise"],
         {"target_rank": 4, "score": "elementwise"}),
    ],
    ids=["random-seed", "numeric-alpha", "rslora-patterns", "lora-bias", "elementwise"],
)
def test_options_and_input_patterns_match_in_memory_pruning(tmp_path, arch, config, argv, kwargs):
    adapter = save_adapter(tmp_path / "adapter", arch, **config)
    report = assert_matches_in_memory(arch, adapter, tmp_path / "out", argv, kwargs)
    if "rank_pattern" in config:
        assert {m.old_rank for n, m in report.modules.items() if n.endswith("q_proj")} == {12}
        assert {m.old_alpha for n, m in report.modules.items() if n.endswith("v_proj")} == {5}


def test_pruning_an_already_pruned_adapter_again(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    assert run_cli(main, [str(adapter), str(tmp_path / "once"), "--target_rank", "6", "--scope", "global"]) == 0
    assert_matches_in_memory("llama", tmp_path / "once", tmp_path / "twice", ["--ratio", "0.5"], {"ratio": 0.5})


def test_bf16_adapter_stays_bf16_and_matches(tmp_path):
    adapter = save_adapter(tmp_path / "adapter", dtype=torch.bfloat16)
    assert_matches_in_memory("llama", adapter, tmp_path / "out", ["--target_rank", "4", "--scope", "global", "--score",
                             "magnitude"], {"target_rank": 4, "scope": "global", "score": "magnitude"})
    assert {t.dtype for t in load_file(tmp_path / "out" / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_bin_adapter_and_modules_to_save_and_other_files_but_run_records(tmp_path):
    adapter = save_adapter(tmp_path / "adapter", "roberta", safe_serialization=False)
    (adapter / "tokenizer.json").write_text('{"tokenizer": true}')
    (adapter / "results.json").write_text("{}")  # a run's record and its checkpoints describe the source run
    (adapter / "checkpoint-5").mkdir()
    (adapter / "checkpoint-5" / "optimizer.pt").write_bytes(b"0")
    assert_matches_in_memory("roberta", adapter, tmp_path / "out", ["--target_rank", "2"], {"target_rank": 2})
    original = torch.load(adapter / "adapter_model.bin", weights_only=True)
    pruned = load_file(tmp_path / "out" / "adapter_model.safetensors")
    head = [key for key in original if "classifier" in key]
    assert head and all(torch.equal(pruned[key], original[key]) for key in head)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "README.md", "adapter_config.json", "adapter_model.safetensors", "prune_report.json", "tokenizer.json"
    ]
    assert (tmp_path / "out" / "tokenizer.json").read_text() == '{"tokenizer": true}'
    mode = {path.name: path.stat().st_mode & 0o777 for path in [adapter, *adapter.iterdir()]}
    assert (tmp_path / "out").stat().st_mode & 0o777 == mode["adapter"]  # not a private temporary folder
    assert (tmp_path / "out" / "adapter_config.json").stat().st_mode & 0o777 == mode["adapter_config.json"]


def test_overwrite_replaces_an_earlier_output(tmp_path):
    adapter = save_adapter(tmp_path / "adapter")
    output = tmp_path / "out"
    output.mkdir()
    (output / "stale.txt").write_text("old")
    assert run_cli(main, [str(adapter), str(output), "--target_rank", "4", "--overwrite"]) == 0
    assert not (output / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]  # no staging folders left


def test_failure_while_writing_leaves_earlier_output_and_no_temporary_folder(tmp_path, monkeypatch):
    adapter = save_adapter(tmp_path / "adapter")
    output = tmp_path / "out"
    output.mkdir()
    (output / "results.json").write_text("{}")

    def disk_full(path, data):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(lorpa.adapter_files, "write_json", disk_full)
    with pytest.raises(OSError, match="No space left"):
        main([str(adapter), str(output), "--target_rank", "4", "--overwrite"])
    assert [p.name for p in output.iterdir()] == ["results.json"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "out"]


def folder_state(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def break_config(adapter, **changes):
    config = json.loads((adapter / "adapter_config.json").read_text())
    config.update(changes)
    (adapter / "adapter_config.json").write_text(json.dumps(config))


def save_other(path, config, build=tiny_llama):
    get_peft_model(build(), config).save_pretrained(path)
    return path


class ConvNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3)
        self.linear = torch.nn.Linear(8, 8)


def two_adapters(path):
    model = get_peft_model(tiny_llama(), LoraConfig(r=4, target_modules=["q_proj"]))
    model.add_adapter("other", LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(path)
    return path


def edited(file_name, edit):
    """A saved adapter with one of its files changed by `edit(path)`."""
    def make(path):
        edit(save_adapter(path) / file_name)
        return path
    return make


def truncate(file):
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


BAD_INPUTS = {
    "dora": (lambda p: save_adapter(p, use_dora=True), [], "DoRA adapters cannot be rank-pruned"),
    "dora-keys": (lambda p: break_config(save_adapter(p, use_dora=True), use_dora=False) or p, [],
                  "lora_magnitude_vector"),
    "adalora": (lambda p: save_other(p, AdaLoraConfig(total_step=10, target_modules=["q_proj"])), [],
                "this one is ADALORA"),
    "ia3": (lambda p: save_other(p, IA3Config(target_modules=["q_proj"], feedforward_modules=[])), [],
            "this one is IA3"),
    "embedding": (lambda p: save_adapter(p, target_modules=["embed_tokens", "q_proj"]), [],
                  "found an embedding adapter"),
    "conv": (lambda p: save_other(p, LoraConfig(r=4, target_modules=["conv"]), ConvNet), [],
             "lora_A of shape [4, 3, 3, 3]"),
    "two-adapters": (two_adapters, [], "holds several adapters ((top level), other)"),
    "no-config": (edited("adapter_config.json", Path.unlink), [], "adapter_config.json not found"),
    "bad-json": (edited("adapter_config.json", lambda f: f.write_text("{r: 16")), [], "is not valid JSON"),
    "no-weights": (edited("adapter_model.safetensors", Path.unlink), [], "no adapter_model.safetensors"),
    "truncated": (edited("adapter_model.safetensors", truncate), [], "cannot read"),
    "garbage": (edited("adapter_model.safetensors", lambda f: f.write_bytes(b"not safetensors")), [], "cannot read"),
    "rank-mismatch": (lambda p: break_config(save_adapter(p), r=8) or p, [],
                      "the tensors have rank 16 but adapter_config.json gives 8"),
    "target-too-large": (save_adapter, ["--target_rank", "17"], "target_rank 17 exceeds the rank of"),
    "ratio": (save_adapter, ["--ratio", "1.0"], "ratio must be in [0, 1)"),
    "both-amounts": (save_adapter, ["--ratio", "0.5", "--target_rank", "3"], "not allowed with argument"),
    "score": (save_adapter, ["--score", "sensitivity"], "unknown score 'sensitivity' for a saved adapter"),
    "activation": (save_adapter, ["--score", "activation"],
                   "the activation score needs the model's inputs (lorpa.calibrate) for a saved adapter"),
    "global norm": (save_adapter, ["--score", "svd", "--scope", "global", "--global_norm", "per_token"],
                    "unknown global_norm 'per_token'"),
    "elementwise-non-square": (save_adapter, ["--score", "elementwise"], "needs in_features == out_features"),
    "alpha": (save_adapter, ["--alpha", "big"], "--alpha must be keep_scaling, fold or a positive number"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_fails_in_one_line_and_touches_nothing(tmp_path, capsys, case):
    make, argv, expected = BAD_INPUTS[case]
    adapter = make(tmp_path / "adapter")
    argv = argv if any(a in argv for a in ("--ratio", "--target_rank")) else [*argv, "--target_rank", "4"]
    before = folder_state(adapter)
    capsys.readouterr()
    assert run_cli(main, [str(adapter), str(tmp_path / "out"), *argv]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert folder_state(adapter) == before
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


@pytest.mark.parametrize("where, expected", [
    ("same", "is ADAPTER_DIR or inside it"),
    ("inside", "is ADAPTER_DIR or inside it"),
    ("parent", "contains ADAPTER_DIR"),
    ("non-empty", "is not empty; pass --overwrite"),
])
def test_output_never_overwrites_input_or_earlier_output(tmp_path, capsys, where, expected):
    adapter = save_adapter(tmp_path / "adapter")
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "results.json").write_text("{}")
    output = {"same": adapter, "inside": adapter / "pruned", "parent": tmp_path, "non-empty": earlier}[where]
    before, before_earlier = folder_state(adapter), folder_state(earlier)
    flags = ["--overwrite"] if where in ("same", "parent") else []
    assert run_cli(main, [str(adapter), str(output), "--target_rank", "4", *flags]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0], errors
    assert folder_state(adapter) == before and folder_state(earlier) == before_earlier
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "earlier"]


def test_module_entry_point_has_help():
    result = processes.run([sys.executable, "-m", "lorpa.prune_adapter", "--help"], timeout=120)
    assert result.returncode == 0
    assert all(flag in result.stdout for flag in ("ADAPTER", "--target_rank", "--ratio", "--scope", "--overwrite"))


@pytest.mark.parametrize("scope", ["module", "global"])
@pytest.mark.parametrize("split", ["balanced", "orthonormal_a"])
def test_svd_from_files_equals_svd_in_memory(tmp_path, scope, split):
    adapter = save_adapter(tmp_path / "adapter", "llama", use_rslora=True)
    report = assert_matches_in_memory("llama", adapter, tmp_path / "out",
                                      ["--target_rank", "3", "--score", "svd", "--svd_split", split, "--scope", scope],
                                      dict(target_rank=3, score="svd", svd_split=split, scope=scope))
    assert report.svd_split == split and all(m.relative_error > 0 for m in report.modules.values())
