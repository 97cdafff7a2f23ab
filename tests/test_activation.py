"""The output-space score: `lorpa.calibrate` records G = (A·X)(A·X)ᵀ, and `score="activation"` keeps the rank-k
update that leaves the least output error on those inputs; every prune reports that error once calibrated."""

import copy
import json
import os
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import lorpa
from lorpa.calibration import layer_calibration
from lorpa.layers import lora_layers

import processes

IN, HIDDEN, OUT, RANK = 12, 10, 9, 6


class TwoLayers(nn.Module):
    """A model whose first layer sees exactly the inputs the test gives, as (batch, length, features)."""

    def __init__(self):
        super().__init__()
        self.first, self.second = nn.Linear(IN, HIDDEN), nn.Linear(HIDDEN, OUT)

    def forward(self, x, attention_mask=None, labels=None):
        return self.second(torch.tanh(self.first(x)))


def lora_model(seed=0, **kwargs):
    torch.manual_seed(seed)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=["first", "second"], init_lora_weights=False,
                        **kwargs)
    return get_peft_model(TwoLayers(), config).eval()


def anisotropic_batches(seed=1, n=4, length=7):
    """Inputs with a few large channels, as the projections of decoder LLMs see; the last rows are padding."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.ones(IN)
    scale[:3] = torch.tensor([12.0, 6.0, 3.0])
    batches = []
    for _ in range(n):
        x = torch.randn(3, length, IN, generator=generator) * scale
        mask = torch.ones(3, length, dtype=torch.long)
        mask[1, -2:] = 0
        mask[2, -4:] = 0
        batches.append({"x": x, "attention_mask": mask})
    return batches


def real_inputs(batches) -> torch.Tensor:
    """X of the first layer: in × tokens, padding left out."""
    return torch.cat([b["x"][b["attention_mask"].bool()] for b in batches]).t()


def update(model, name="first"):
    layer = lora_layers(model)[name]
    return layer.scaling["default"] * layer.lora_B["default"].weight @ layer.lora_A["default"].weight


def output_error(before, after, inputs):
    return float(torch.linalg.norm((before - after) @ inputs) / torch.linalg.norm(before @ inputs))


def test_calibration_records_the_gram_of_the_real_tokens_only():
    model, batches = lora_model(), anisotropic_batches()
    counted = lorpa.calibrate(model, batches)
    layer = lora_layers(model)["first"]
    X = real_inputs(batches).double()
    A = layer.lora_A["default"].weight.double()
    calibration = layer_calibration(layer, "default")
    assert counted == calibration.tokens == X.shape[1] == 4 * (7 + 5 + 3)
    assert torch.allclose(calibration.gram, A @ X @ X.t() @ A.t(), rtol=1e-5)


@pytest.mark.parametrize("rank", [1, 2, 4])
def test_the_activation_cut_leaves_the_least_output_error_any_rank_k_update_can(rank):
    model, batches = lora_model(), anisotropic_batches()
    X = real_inputs(batches)
    before = update(model).detach().clone()
    lorpa.calibrate(model, batches)
    report = lorpa.prune(model, target_rank=rank, score="activation")
    after = update(model).detach()
    assert torch.linalg.matrix_rank(after.double(), rtol=1e-6) == rank
    singular = torch.linalg.svdvals((before @ X).double())  # the optimum: the SVD of the materialised ΔW·X
    optimum = float(singular[rank:].square().sum().sqrt() / singular.square().sum().sqrt())
    assert output_error(before, after, X) == pytest.approx(optimum, abs=1e-6)
    assert report.modules["first"].output_error == pytest.approx(optimum, abs=1e-6)
    assert report.modules["first"].relative_error == pytest.approx(
        float(torch.linalg.norm(before - after) / torch.linalg.norm(before)), abs=1e-6)


def test_the_activation_cut_never_leaves_more_output_error_than_the_singular_cut():
    batches = anisotropic_batches()
    for rank in range(1, RANK):
        errors = {}
        for score in ("svd", "activation"):
            model = lora_model()
            lorpa.calibrate(model, batches)
            errors[score] = lorpa.prune(model, target_rank=rank, score=score).modules
        for name in errors["svd"]:
            assert errors["activation"][name].output_error <= errors["svd"][name].output_error + 1e-9
            assert errors["activation"][name].relative_error >= errors["svd"][name].relative_error - 1e-9
    assert errors["activation"]["first"].output_error < errors["svd"]["first"].output_error - 1e-3  # it matters here


def test_on_whitened_inputs_the_activation_cut_is_the_singular_cut():
    """X·Xᵀ = I makes G = A·Aᵀ, and the best rank-k ΔW·X is then the best rank-k ΔW."""
    n = 40
    # n × in, orthonormal columns
    q, _ = torch.linalg.qr(torch.randn(n, IN, generator=torch.Generator().manual_seed(3)))
    batches = [{"x": q.t().t().reshape(1, n, IN).clone(), "attention_mask": torch.ones(1, n, dtype=torch.long)}]
    assert torch.allclose(real_inputs(batches) @ real_inputs(batches).t(), torch.eye(IN), atol=1e-5)
    by_weight, by_output = lora_model(), lora_model()
    lorpa.calibrate(by_output, batches)
    lorpa.prune(by_weight, target_rank=2, score="svd")
    lorpa.prune(by_output, target_rank=2, score="activation")
    assert torch.allclose(update(by_output), update(by_weight), atol=1e-6)


def test_pruning_to_full_rank_changes_no_output():
    model, batches = lora_model(), anisotropic_batches()
    reference = copy.deepcopy(model)
    lorpa.calibrate(model, batches)
    report = lorpa.prune(model, target_rank=RANK, score="activation")
    with torch.no_grad():
        for batch in batches:
            assert torch.allclose(model(**batch), reference(**batch), atol=1e-5)
    assert all(m.output_error < 1e-6 and m.relative_error < 1e-6 for m in report.modules.values())


@pytest.mark.parametrize("norm", ["absolute", "relative"])
def test_a_global_budget_ranks_output_energy_and_keeps_min_rank(norm):
    model, batches = lora_model(), anisotropic_batches()
    lorpa.calibrate(model, batches)
    scores = lorpa.rank_scores(model, "activation")
    report = lorpa.prune(model, target_rank=3, score="activation", scope="global", min_rank=2, global_norm=norm)
    ranks = report.ranks
    assert sum(ranks.values()) == 3 * len(ranks) and min(ranks.values()) >= 2
    assert report.global_norm == norm
    values = {name: torch.tensor(m.scores) for name, m in report.modules.items()}
    if norm == "absolute":  # the amplitudes rank_scores gives, comparable across modules
        assert all(torch.allclose(values[name], scores[name]) for name in scores)
    else:
        assert all(float(v.square().sum()) == pytest.approx(1.0) for v in values.values())
    # beyond the reserved min_rank, the budget goes to the largest scores anywhere
    free = sorted([(float(v[i]), name) for name, v in values.items() for i in range(2, len(v))], reverse=True)
    assert sorted(name for _, name in free[: 6 - 4]) == sorted(name for name, r in ranks.items() for _ in range(r - 2))


def test_every_score_reports_its_output_error_once_calibrated():
    batches = anisotropic_batches()
    X = real_inputs(batches)
    for score in ("magnitude", "random", "svd"):
        model = lora_model()
        before = update(model).detach().clone()
        lorpa.calibrate(model, batches)
        report = lorpa.prune(model, target_rank=2, score=score, seed=0, alpha=5.0)  # a new alpha rescales too
        assert report.modules["first"].output_error == pytest.approx(output_error(before, update(model), X), abs=1e-6)
        assert report.mean_output_error is not None
    uncalibrated = lorpa.prune(lora_model(), target_rank=2)
    assert uncalibrated.mean_output_error is None and uncalibrated.modules["first"].output_error is None


def test_the_prune_refuses_the_activation_score_without_a_calibration_of_the_current_adapter():
    model = lora_model()
    with pytest.raises(ValueError, match="needs a calibration of the current adapter; run lorpa.calibrate"):
        lorpa.prune(model, target_rank=2, score="activation")
    lorpa.calibrate(model, anisotropic_batches())
    lorpa.prune(model, target_rank=4, score="activation")
    with pytest.raises(ValueError, match="needs a calibration"):  # the old G describes the old A
        lorpa.prune(model, target_rank=2, score="activation")


def test_a_calibration_pass_leaves_the_model_and_its_training_state_untouched():
    model = lora_model(lora_dropout=0.5).train()
    model.base_model.model.second.eval()  # a module in its own mode stays in it
    batches = anisotropic_batches()
    weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    modes = {n: m.training for n, m in model.named_modules()}
    rng = torch.get_rng_state()
    lorpa.calibrate(model, batches)
    assert torch.equal(torch.get_rng_state(), rng)
    assert {n: m.training for n, m in model.named_modules()} == modes
    assert all(torch.equal(p, weights[n]) and p.grad is None for n, p in model.named_parameters())
    torch.manual_seed(5)
    first = model(**batches[0])
    torch.manual_seed(5)
    assert torch.equal(first, model(**batches[0]))  # dropout still on, drawing the same numbers


def test_loss_tokens_count_the_positions_whose_next_token_has_a_label():
    model = lora_model()
    batch = anisotropic_batches(n=1)[0]
    labels = torch.full((3, 7), -100)
    labels[0, 4:] = 1  # positions 3..5 predict labelled tokens 4..6
    labels[2, 1] = 1  # position 0 predicts it
    counted = lorpa.calibrate(model, [{**batch, "labels": labels}], tokens="loss")
    layer = lora_layers(model)["first"]
    X = torch.cat([batch["x"][0, 3:6], batch["x"][2, :1]]).t().double()
    A = layer.lora_A["default"].weight.double()
    assert counted == 4 and torch.allclose(layer_calibration(layer, "default").gram, A @ X @ X.t() @ A.t(), rtol=1e-5)
    with pytest.raises(ValueError, match="needs batches with labels"):
        lorpa.calibrate(model, [batch], tokens="loss")


def test_grams_summed_under_two_process_ddp_give_both_processes_the_same_factors(tmp_path):
    """Each process calibrates on its half of the batches; both prune exactly as one process given them all."""
    script = Path(__file__).with_name("ddp_calibrate.py")
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", PYTHONPATH=str(Path(__file__).resolve().parent))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script, tmp_path]
    done = processes.run(command, timeout=180, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    factors = [torch.load(tmp_path / f"process{rank}.pt") for rank in (0, 1)]
    assert factors[0].keys() == factors[1].keys() and all(torch.equal(factors[0][k], factors[1][k])
                                                          for k in factors[0])
    model = lora_model()
    lorpa.calibrate(model, anisotropic_batches())
    lorpa.prune(model, target_rank=2, score="activation", scope="global")
    single = {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}
    assert all(torch.allclose(factors[0][k], single[k], atol=1e-5) for k in single)
    assert json.loads((tmp_path / "tokens.json").read_text()) == {"tokens": 4 * (7 + 5 + 3)}
