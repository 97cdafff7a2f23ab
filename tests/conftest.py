"""Tiny models built from configs, so every test runs offline in seconds."""

import copy

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import BartConfig, BartForConditionalGeneration, RobertaConfig, RobertaForSequenceClassification

from lorpa.cli import run_cli

torch.set_num_threads(1)

# submitit's first import reconfigures logging (`logging.config.dictConfig`), which closes every handler already
# installed; absl's handler (rouge-score imports absl) closes its stream on that unless it is the current
# sys.stderr, so under capsys it would close pytest's own capture file and break every later test of the worker.
# Imported once here, before any test installs a handler, it reconfigures nothing mid-suite.
try:
    import submitit  # noqa: F401
except ImportError:  # the slurm extra is optional; its tests skip
    pass


def tiny_roberta(num_labels=2, seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(
        vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
        max_position_embeddings=80, num_labels=num_labels, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
    )
    return RobertaForSequenceClassification(config).eval()


def tiny_bart(seed=0):
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=120, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
        decoder_attention_heads=4, encoder_ffn_dim=48, decoder_ffn_dim=48, max_position_embeddings=80,
        dropout=0.0, attention_dropout=0.0, activation_dropout=0.0,
    )
    return BartForConditionalGeneration(config).eval()


def with_lora(base, r=16, task_type="SEQ_CLS", seed=1, **kwargs):
    """A LoRA model with random A *and* B, so every rank component changes the output."""
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, lora_dropout=0.0, init_lora_weights=False, task_type=task_type,
                        **kwargs)
    return get_peft_model(base, config).eval()


@pytest.fixture
def roberta_pair():
    """(untouched copy of the base model, LoRA model built on the same weights)."""
    base = tiny_roberta()
    return copy.deepcopy(base), with_lora(base)


@pytest.fixture
def bart_pair():
    base = tiny_bart()
    return copy.deepcopy(base), with_lora(base, task_type="SEQ_2_SEQ_LM")


@pytest.fixture
def token_batch():
    torch.manual_seed(2)
    return {"input_ids": torch.randint(3, 120, (3, 11)), "attention_mask": torch.ones(3, 11, dtype=torch.long)}


@pytest.fixture
def earlier_output(tmp_path):
    """An output folder from an earlier run, which a failing run must leave exactly as it was."""
    output_dir = tmp_path / "out"
    output_dir.mkdir()
    (output_dir / "results.json").write_text('{"earlier": true}')
    return output_dir


def assert_one_line_failure(main, argv, expected, capsys, earlier_output):
    """Bad input: exit status 2, a single `error: ...` line naming the problem, earlier output intact."""
    assert run_cli(main, argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1 and errors[0].startswith("error: ") and expected in errors[0]
    assert (earlier_output / "results.json").read_text() == '{"earlier": true}'
    assert [p.name for p in earlier_output.iterdir()] == ["results.json"]
