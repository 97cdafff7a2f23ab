"""QLoRA: LoRPA on a base model quantised by bitsandbytes (which runs 4- and 8-bit layers on CPU since 0.46)."""

import json
import sys

import pytest
import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from transformers import AutoModelForCausalLM, BitsAndBytesConfig

import lorpa
import run_clm
from lorpa.layers import lora_layers
from test_run_clm import argv_for, data_files, read_results  # noqa: F401  (a fixture)

from conftest import assert_one_line_failure
from tiny_assets import write_tiny_decoder

bitsandbytes = pytest.importorskip("bitsandbytes",
                                   reason="the qlora extra (pip install 'lorpa[qlora]') is not installed")

@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    """Hidden size 64: bitsandbytes' CPU 4-bit kernels need rows of at least one 64-value block."""
    torch.manual_seed(0)
    return write_tiny_decoder(tmp_path_factory.mktemp("tiny-llama-64"), "llama", hidden_size=64)


QUANTISATIONS = {
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                       bnb_4bit_compute_dtype=torch.bfloat16),
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
}


def quantised(folder, kind):
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=QUANTISATIONS[kind](),
                                                 device_map={"": "cpu"})
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


@pytest.mark.parametrize("kind", list(QUANTISATIONS))
def test_a_quantised_base_is_pruned_in_memory_and_reloads_with_plain_peft(llama_dir, tmp_path, kind):
    torch.manual_seed(0)
    model = lorpa.get_peft_model(quantised(llama_dir, kind), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                                      target_modules="all-linear",
                                                                      init_lora_weights=False))
    layer = next(iter(lora_layers(model).values()))
    assert type(layer).__module__ == "peft.tuners.lora.bnb"  # LoRA on bitsandbytes layers
    inputs = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(1))
    report = lorpa.prune(model, target_rank=2, score="svd", scope="global")
    assert sum(report.ranks.values()) == 2 * len(report.ranks) and report.mean_relative_error < 1
    with torch.no_grad():  # eval mode: bitsandbytes' CPU kernels differ between training and inference
        before = model.eval()(input_ids=inputs).logits
    model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(quantised(llama_dir, kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        assert torch.equal(reloaded(input_ids=inputs).logits, before)


def test_train_two_stage_runs_both_stages_on_a_4bit_base(llama_dir, tmp_path):
    from datasets import Dataset
    from transformers import Trainer, TrainingArguments

    model = lorpa.get_peft_model(quantised(llama_dir, "4bit"), LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16,
                                                                         target_modules="all-linear"))
    ids = torch.randint(3, 100, (8, 12), generator=torch.Generator().manual_seed(3)).tolist()
    data = Dataset.from_dict({"input_ids": ids, "labels": ids})
    args = TrainingArguments(str(tmp_path), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to="none", save_strategy="no", disable_tqdm=True, use_cpu=True)
    result = lorpa.train_two_stage(model, lambda m, a: Trainer(model=m, args=a, train_dataset=data), args,
                                   stage1_ratio=0.5, target_rank=2, score="svd")
    assert result.trainer.state.global_step == 2 and set(result.prune_report.ranks.values()) == {2}
    trained = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert trained and all(p.requires_grad for p in trained)


def test_run_clm_trains_both_stages_on_a_4bit_base_resumes_mid_stage_2_and_merges_dequantised(
        llama_dir, data_files, tmp_path, capsys, monkeypatch):  # noqa: F811  (data_files: the imported fixture)
    # On CPUs with AVX-512 BF16, bitsandbytes repacks a 4-bit weight for a faster kernel at its first inference
    # forward, and trains on the repacked weight afterwards: a run resumed before any evaluation would then compute
    # with the other kernel. With one kernel throughout, a resumed run ends where the whole run ends (to rel 1e-4,
    # as the other resume tests: bfloat16 compute).
    monkeypatch.setattr(bitsandbytes.nn.modules, "has_avx512bf16", lambda: False)
    flags = ["--load_in_4bit", "true", "--save_strategy", "steps", "--save_steps", "1", "--save_total_limit", "10",
             "--num_train_epochs", "3"]
    complete = tmp_path / "complete"
    run_clm.main(argv_for(llama_dir, complete, data_files, *flags, "--merge_final", "true"))
    results = read_results(complete)
    assert results["config"]["load_in_4bit"] and set(results["ranks"].values()) == {2}
    fidelity = results["fidelity"]  # measured on the 4-bit base, against the uncut adapter on the same base
    assert fidelity["positions"] > 0 and 0 < fidelity["agreement"] <= 100 and fidelity["kl_mean"] >= 0
    assert "merged into a copy of the base loaded unquantised" in capsys.readouterr().out
    merged = AutoModelForCausalLM.from_pretrained(complete / "merged")
    # plain weights, loadable without bitsandbytes
    assert not any("4bit" in type(m).__name__ for m in merged.modules())

    checkpoints = sorted((complete / "stage2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    resumed = tmp_path / "resumed"
    # the same run, interrupted after stage 2's first step
    run_clm.main(argv_for(llama_dir, resumed, data_files, *flags))
    for later in sorted((resumed / "stage2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))[1:]:
        for file in later.iterdir():
            file.unlink()
        later.rmdir()
    (resumed / "results.json").unlink()
    run_clm.main(argv_for(llama_dir, resumed, data_files, *flags, "--resume_from_checkpoint",
                          str(resumed / "stage2" / checkpoints[0].name)))
    again = read_results(resumed)
    assert (again["ranks"] == results["ranks"]
            and again["metrics"]["loss"] == pytest.approx(results["metrics"]["loss"], rel=1e-4))

    base = quantised(llama_dir, "4bit")
    reloaded = PeftModel.from_pretrained(base, complete).eval()
    inputs = torch.randint(3, 100, (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        quantised_logits = reloaded(input_ids=inputs).logits.float()
        merged_logits = merged(input_ids=inputs).logits.float()
    # merged into unquantised weights, the model differs from the 4-bit one by the quantisation error only
    assert torch.nn.functional.cosine_similarity(quantised_logits.flatten(), merged_logits.flatten(), dim=0) > 0.95


def test_both_quantisations_at_once_and_a_missing_extra_are_one_line(
        llama_dir, data_files, tmp_path, capsys, earlier_output, monkeypatch):  # noqa: F811
    argv = argv_for(llama_dir, earlier_output, data_files, "--overwrite_output_dir", "true")
    assert_one_line_failure(run_clm.main, argv + ["--load_in_4bit", "true", "--load_in_8bit", "true"],
                            "give --load_in_4bit or --load_in_8bit, not both", capsys, earlier_output)
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # as if the extra were not installed
    assert_one_line_failure(run_clm.main, argv + ["--load_in_4bit", "true"],
                            "--load_in_4bit / --load_in_8bit need bitsandbytes: pip install 'lorpa[qlora]'", capsys,
                            earlier_output)
    assert json.loads((earlier_output / "results.json").read_text()) == {"earlier": True}
