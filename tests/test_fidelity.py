"""Label-free fidelity to the uncut adapter (`lorpa.fidelity`) against direct computations with two models."""

import copy
import json
import math

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorpa
from lorpa import fidelity
from lorpa.cli import run_cli
from lorpa.commands import main as lorpa_main

from conftest import tiny_bart, tiny_roberta, with_lora


def tiny_llama_lora():
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=120, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    return with_lora(base.eval(), task_type="CAUSAL_LM", target_modules=["q_proj", "v_proj", "up_proj"])


def padded_batches(labels: bool, seq2seq: bool = False):
    """Two batches, right-padded, some positions not counted by the loss (-100)."""
    generator = torch.Generator().manual_seed(3)
    batches = []
    for size in (3, 2):
        ids = torch.randint(3, 120, (size, 9), generator=generator)
        mask = torch.ones(size, 9, dtype=torch.long)
        mask[0, 6:] = 0
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            target = torch.randint(3, 120, (size, 7), generator=generator) if seq2seq else ids.clone()
            target[0, :2] = -100
            if not seq2seq:
                target[mask == 0] = -100
            batch["labels"] = target
        batches.append(batch)
    return batches


def direct(uncut, pruned, batches, kind):
    """Per position KL(uncut ‖ pruned), top-1 agreement and label log-likelihoods, with full softmaxes."""
    kls, same, nll = [], [], [0.0, 0.0, 0]
    with torch.no_grad():
        for batch in batches:
            p_logits, q_logits = uncut(**batch).logits.double(), pruned(**batch).logits.double()
            if kind == "causal":
                p_logits, q_logits = p_logits[:, :-1], q_logits[:, :-1]
                targets = batch["labels"][:, 1:] if "labels" in batch else None
                counted = targets != -100 if targets is not None else batch["attention_mask"][:, 1:].bool()
            elif kind == "seq2seq":
                targets = batch["labels"]
                counted = targets != -100
            else:
                targets, counted = None, torch.ones(p_logits.shape[0], dtype=torch.bool)
            p, q = torch.log_softmax(p_logits[counted], -1), torch.log_softmax(q_logits[counted], -1)
            kls += (p.exp() * (p - q)).sum(-1).tolist()
            same += (p.argmax(-1) == q.argmax(-1)).tolist()
            if targets is not None:
                chosen = targets[counted][:, None]
                nll[0] -= float(p.gather(-1, chosen).sum())
                nll[1] -= float(q.gather(-1, chosen).sum())
                nll[2] += len(chosen)
    ratio = math.exp((nll[1] - nll[0]) / nll[2]) if nll[2] else None
    return kls, 100 * sum(same) / len(same), ratio


CASES = {
    "classifier": (lambda: with_lora(tiny_roberta(num_labels=3)), "classifier", False),
    "causal LM, loss positions": (tiny_llama_lora, "causal", True),
    "causal LM, every real token": (tiny_llama_lora, "causal", False),
    "seq2seq": (lambda: with_lora(tiny_bart(), task_type="SEQ_2_SEQ_LM"), "seq2seq", True),
}


@pytest.mark.parametrize("case", CASES)
def test_an_unpruned_adapter_has_full_agreement_and_no_divergence(case):
    build, kind, labels = CASES[case]
    model, batches = build(), padded_batches(labels, kind == "seq2seq")
    measured = fidelity.compare(model, batches, fidelity.reference(model, batches))
    assert measured.agreement == 100 and measured.kl_mean == 0 and measured.kl_p99 == 0
    assert measured.perplexity_ratio in ((1.0,) if labels else (None,))


@pytest.mark.parametrize("case", CASES)
def test_fidelity_equals_a_direct_computation_with_two_models(case):
    build, kind, labels = CASES[case]
    uncut = build()
    pruned = copy.deepcopy(uncut)
    batches = padded_batches(labels, kind == "seq2seq")
    recorded = fidelity.reference(pruned, batches)  # taken before the cut, on the model that is then pruned
    lorpa.prune(pruned, target_rank=1, score="svd")
    measured = fidelity.compare(pruned, batches, recorded)
    kls, agreement, ratio = direct(uncut, pruned, batches, kind)
    assert measured.positions == len(kls)
    assert measured.agreement == pytest.approx(agreement) and 0 < measured.kl_mean
    assert measured.kl_mean == pytest.approx(sum(kls) / len(kls), rel=1e-4)
    assert measured.kl_p90 == pytest.approx(float(torch.tensor(kls).double().quantile(0.9)), rel=1e-4)
    assert measured.kl_p50 == pytest.approx(float(torch.tensor(kls).double().quantile(0.5)), rel=1e-4)
    assert measured.kl_p99 == pytest.approx(float(torch.tensor(kls).double().quantile(0.99)), rel=1e-4)
    assert (measured.perplexity_ratio is None) == (ratio is None)
    if ratio is not None:
        assert measured.perplexity_ratio == pytest.approx(ratio, rel=1e-5)
    assert measured.reference_tail is None  # every class fits in the kept top k: the KL is exact


def test_a_kept_top_k_gives_a_lower_bound_short_by_the_tail():
    uncut = tiny_llama_lora()
    pruned = copy.deepcopy(uncut)
    batches = padded_batches(True)
    recorded = fidelity.reference(pruned, batches, top_k=8)
    lorpa.prune(pruned, target_rank=1, score="svd")
    coarse = fidelity.compare(pruned, batches, recorded)
    full = fidelity.compare(pruned, batches, fidelity.reference(uncut, batches))
    assert 0 < coarse.kl_mean <= full.kl_mean and 0 < coarse.reference_tail < 1
    assert coarse.agreement == full.agreement  # the top-1 answer is always kept


def test_a_regression_head_compares_predictions_relative_to_their_variance():
    uncut = with_lora(tiny_roberta(num_labels=1))
    pruned = copy.deepcopy(uncut)
    batches = padded_batches(False)
    recorded = fidelity.reference(pruned, batches)
    lorpa.prune(pruned, target_rank=1, score="svd")
    measured = fidelity.compare(pruned, batches, recorded)
    with torch.no_grad():
        before = torch.cat([uncut(**b).logits[:, 0] for b in batches]).double()
        after = torch.cat([pruned(**b).logits[:, 0] for b in batches]).double()
    error = float((after - before).square().mean() / before.var(unbiased=False))
    assert measured.agreement is None and measured.prediction_error == pytest.approx(error, rel=1e-5)
    assert measured.kl_mean == pytest.approx(error / 2, rel=1e-5)  # Gaussians of the uncut predictions' variance


@pytest.fixture(scope="module")
def decoder_files(tmp_path_factory):
    """A tiny causal LM and tokenizer on disk, a LoRA adapter of it, and unlabelled rows."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from lorpa.tasks.clm.arithmetic import arithmetic_rows

    from tiny_assets import write_tiny_decoder

    folder = tmp_path_factory.mktemp("decoder")
    model_dir = write_tiny_decoder(folder / "model", "llama")
    torch.manual_seed(1)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(
        r=8, lora_alpha=16, init_lora_weights=False, target_modules="all-linear", task_type="CAUSAL_LM"))
    model.save_pretrained(folder / "adapter")
    rows = folder / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n"
                            for r in arithmetic_rows(40, 5)))
    return model_dir, folder / "adapter", rows


def test_fidelity_from_files_equals_two_models_loaded_apart(decoder_files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model_dir, adapter, rows = decoder_files
    argv = ["prune", str(adapter), str(tmp_path / "out"), "--target_rank", "2", "--base_model", str(model_dir),
            "--calibration_data", str(rows), "--calibration_rows", "24"]
    assert run_cli(lorpa_main, argv) == 0
    measured = json.loads((tmp_path / "out" / "prune_report.json").read_text())["fidelity"]
    comparison = fidelity.AdapterComparison(str(model_dir), adapter, str(rows), rows=24)
    uncut = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), adapter)
    pruned = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(model_dir), tmp_path / "out")
    direct = fidelity.compare(pruned, comparison.batches, fidelity.reference(uncut, comparison.batches))
    expected = direct.to_dict()
    assert measured.keys() == expected.keys()
    for key, value in expected.items():  # no labels in the rows: no perplexity ratio
        assert measured[key] == (value if value is None else pytest.approx(value, rel=1e-9, abs=1e-12)), key
    assert measured["positions"] == sum(int(b["attention_mask"][:, 1:].sum()) for b in comparison.batches)
    assert "of top-1 answers kept" in (tmp_path / "out" / "README.md").read_text()


def test_a_label_free_tolerance_from_files_keeps_the_smallest_that_agrees_enough(decoder_files, tmp_path, capsys):
    model_dir, adapter, rows = decoder_files
    argv = ["prune", str(adapter), str(tmp_path / "out"), "--tolerance", "95", "--tolerance_metric", "agreement",
            "--base_model", str(model_dir), "--calibration_data", str(rows), "--calibration_rows", "24"]
    assert run_cli(lorpa_main, argv) == 0
    search = json.loads((tmp_path / "out" / "tolerance_search.json").read_text())
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert search["metric"] == "agreement" and search["reference"] == 100
    assert report["fidelity"]["agreement"] >= 95 and sum(m["new_rank"] for m in report["modules"].values()) == \
        search["kept"]
    assert all(c["score"] < 95 for c in search["candidates"] if c["total_rank"] < search["kept"])
    assert "the smallest with agreement 95" in capsys.readouterr().out


def test_a_nearly_flat_reference_is_said_with_the_fidelity():
    from lorpa.fidelity import Fidelity

    peaked = Fidelity(99.0, 0.001, 0.0005, 0.002, 0.01, 512, reference_tail=0.02).describe()
    flat = Fidelity(60.0, 0.0003, 0.0002, 0.0008, 0.002, 512, reference_tail=0.95).describe()
    assert "lower bound" not in peaked and peaked.endswith("over 512 positions")
    assert flat.endswith("; 95% of the uncut probability lies outside its top 128 answers: nearly flat, so the KL is "
                         "a loose lower bound and top-1 answers are near ties")
