"""A pruned model saves as a standard peft adapter that plain peft reloads exactly."""

import json

import pytest
import torch
from peft import PeftModel

import lorpa
from lorpa.layers import lora_layers


def prune_unevenly(model):
    """A global budget gives modules different ranks, which is what rank_pattern must carry."""
    report = lorpa.prune(model, target_rank=5, scope="global", min_rank=1)
    assert len(set(report.ranks.values())) > 1
    return report


def test_roberta_roundtrip_gives_identical_logits(roberta_pair, token_batch, tmp_path):
    base, model = roberta_pair
    report = prune_unevenly(model)
    with torch.no_grad():
        expected = model(**token_batch).logits
    model.save_pretrained(tmp_path)

    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["rank_pattern"] == report.ranks
    assert saved["alpha_pattern"] == {n: m.new_alpha for n, m in report.modules.items()}

    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    for name, layer in lora_layers(reloaded).items():
        assert layer.r["default"] == report.ranks[name]
    with torch.no_grad():
        assert torch.equal(reloaded(**token_batch).logits, expected)


def test_bart_roundtrip_covers_encoder_decoder_and_cross_attention(bart_pair, token_batch, tmp_path):
    base, model = bart_pair
    names = list(lora_layers(model))
    assert any("encoder_attn.q_proj" in n for n in names) and any("encoder.layers" in n for n in names)
    assert any("decoder.layers.0.self_attn.v_proj" in n for n in names)
    report = prune_unevenly(model)
    assert set(report.ranks) == set(names)
    batch = dict(token_batch, decoder_input_ids=token_batch["input_ids"][:, :5])
    with torch.no_grad():
        expected = model(**batch).logits
    model.save_pretrained(tmp_path)

    reloaded = PeftModel.from_pretrained(base, tmp_path).eval()
    assert {n: layer.r["default"] for n, layer in lora_layers(reloaded).items()} == report.ranks
    with torch.no_grad():
        assert torch.equal(reloaded(**batch).logits, expected)


def test_merge_and_unload_after_pruning(roberta_pair, token_batch):
    _, model = roberta_pair
    prune_unevenly(model)
    with torch.no_grad():
        expected = model(**token_batch).logits
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(**token_batch).logits, expected, rtol=1e-5, atol=1e-5)


def test_pruning_a_merged_adapter_is_refused(roberta_pair):
    _, model = roberta_pair
    model.merge_adapter()
    with pytest.raises(ValueError, match="merged into the base weights"):
        lorpa.prune(model, ratio=0.5)
