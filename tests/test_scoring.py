import copy
import importlib.util
from pathlib import Path

import pytest
import torch

import lorpa
from lorpa.layers import factors, lora_layers

from conftest import tiny_roberta, with_lora


def dense_component(layer, i):
    lora_A, lora_B = factors(layer, "default")
    return torch.outer(lora_B[:, i], lora_A[i, :]).detach()


def test_magnitude_scores_equal_dense_outer_products(roberta_pair):
    _, model = roberta_pair
    scores = lorpa.rank_scores(model)
    layers = lora_layers(model)
    assert set(scores) == set(layers) and len(scores) == 4  # query/value in 2 layers
    for name, layer in layers.items():
        brute = torch.tensor([dense_component(layer, i).abs().sum() for i in range(layer.r["default"])])
        torch.testing.assert_close(scores[name], brute, rtol=1e-5, atol=0)


def test_elementwise_scores_equal_authors_formula(roberta_pair):
    _, model = roberta_pair
    scores = lorpa.rank_scores(model, "elementwise")
    for name, layer in lora_layers(model).items():
        lora_A, lora_B = factors(layer, "default")
        brute = torch.tensor(
            [sum(abs(lora_B[j, i].item() * lora_A[i, j].item()) for j in range(lora_A.shape[1]))
             for i in range(lora_A.shape[0])]
        )
        torch.testing.assert_close(scores[name], brute, rtol=1e-5, atol=1e-7)


def test_elementwise_score_rejects_non_square_layer():
    model = with_lora(tiny_roberta(), target_modules=["query", "intermediate.dense"])
    with pytest.raises(ValueError, match="in_features == out_features"):
        lorpa.rank_scores(model, "elementwise")


def test_random_scores_are_seeded_and_differ_per_module(roberta_pair):
    _, model = roberta_pair
    first, again, other = (lorpa.rank_scores(model, "random", seed=s) for s in (3, 3, 4))
    names = list(first)
    assert all(torch.equal(first[n], again[n]) for n in names)
    assert not torch.equal(first[names[0]], other[names[0]])
    assert not torch.equal(first[names[0]], first[names[1]])


def test_unknown_score_is_rejected(roberta_pair):
    with pytest.raises(ValueError, match="unknown score 'l2'"):
        lorpa.rank_scores(roberta_pair[1], "l2")


def _benchmark(name):
    spec = importlib.util.spec_from_file_location(name,
                                                  Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_benchmarks_authors_prune_keeps_what_elementwise_keeps_and_leaves_r0(roberta_pair):
    """The speed baseline is the authors' algorithm: same kept sets as score="elementwise" on untied scores."""
    _, model = roberta_pair
    reference = copy.deepcopy(model)
    kept = _benchmark("prune_speed").authors_prune(model, target_rank=4)
    report = lorpa.prune(reference, target_rank=4, score="elementwise")
    assert {name: sorted(indices) for name, indices in kept.items()} == {n: m.kept for n, m in report.modules.items()}
    for name, layer in lora_layers(model).items():
        assert layer.lora_A["default"].weight.shape[0] == 4
        assert layer.r["default"] == 16  # like the released code, rank and scaling stay at r0
        assert torch.equal(layer.lora_A["default"].weight, lora_layers(reference)[name].lora_A["default"].weight)
