import copy

import pytest
import torch

import lorpa
from lorpa.layers import factors, lora_layers

from conftest import tiny_roberta, with_lora


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, copy.deepcopy(model.peft_config["default"])


@pytest.mark.parametrize("kwargs", [{"ratio": 0.0}, {"target_rank": 16}])
def test_pruning_nothing_is_bit_identical(roberta_pair, token_batch, kwargs):
    _, model = roberta_pair
    before = logits(model, token_batch)
    report = lorpa.prune(model, **kwargs)
    assert all(m.kept == list(range(16)) for m in report.modules.values())
    assert torch.equal(logits(model, token_batch), before)


def test_keep_scaling_removes_exactly_the_pruned_components(roberta_pair):
    _, model = roberta_pair
    layers = lora_layers(model)
    scaling = {n: layer.scaling["default"] for n, layer in layers.items()}
    components = {
        n: [torch.outer(factors(layer, "default")[1][:, i], factors(layer, "default")[0][i]).detach()
            for i in range(16)]
        for n, layer in layers.items()
    }
    delta_before = {n: layer.get_delta_weight("default").detach() for n, layer in layers.items()}
    x = torch.randn(5, 32)
    outputs_before = {n: layer(x).detach() for n, layer in layers.items()}

    report = lorpa.prune(model, target_rank=5)

    for name, layer in layers.items():
        removed = [i for i in range(16) if i not in report.modules[name].kept]
        assert len(removed) == 11
        removed_delta = scaling[name] * sum(components[name][i] for i in removed)
        assert layer.scaling["default"] == pytest.approx(scaling[name])
        torch.testing.assert_close(layer.get_delta_weight("default"), delta_before[name] - removed_delta)
        torch.testing.assert_close(layer(x), outputs_before[name] - x @ removed_delta.T, rtol=1e-5, atol=1e-6)


def test_module_scope_keeps_the_top_components_in_order(roberta_pair):
    _, model = roberta_pair
    scores = lorpa.rank_scores(model)
    before = {n: [t.detach().clone() for t in factors(layer, "default")] for n, layer in lora_layers(model).items()}
    report = lorpa.prune(model, ratio=0.75)
    for name, layer in lora_layers(model).items():
        expected = sorted(torch.topk(scores[name], 4).indices.tolist())
        assert report.modules[name].kept == expected
        assert layer.r["default"] == 4
        lora_A, lora_B = factors(layer, "default")
        assert torch.equal(lora_A, before[name][0][expected])
        assert torch.equal(lora_B, before[name][1][:, expected])


def test_global_scope_spends_the_same_budget_on_the_best_components():
    model = with_lora(tiny_roberta(), r=8)
    layers = lora_layers(model)
    weak = next(iter(layers))
    with torch.no_grad():
        factors(layers[weak], "default")[1].mul_(1e-4)  # this module's components are all the weakest
    scores = lorpa.rank_scores(model)

    report = lorpa.prune(model, target_rank=3, scope="global", min_rank=2)

    assert sum(report.ranks.values()) == 3 * len(layers)
    assert report.ranks[weak] == 2  # held up only by min_rank
    assert all(rank >= 2 for rank in report.ranks.values())
    reserved = {(n, i) for n, s in scores.items()
                for i in torch.sort(s, descending=True, stable=True).indices[:2].tolist()}
    kept = {(n, i) for n, m in report.modules.items() for i in m.kept}
    free_kept = [scores[n][i] for n, i in kept - reserved]
    pruned = [scores[n][i] for n, s in scores.items() for i in range(8) if (n, i) not in kept]
    assert min(free_kept) >= max(pruned)
    for name, layer in layers.items():
        assert layer.r["default"] == report.ranks[name] == factors(layer, "default")[0].shape[0]


def test_config_and_layers_agree_after_pruning(roberta_pair):
    _, model = roberta_pair
    report = lorpa.prune(model, target_rank=4, scope="global", alpha=8)
    config = model.peft_config["default"]
    assert config.rank_pattern == report.ranks
    for name, layer in lora_layers(model).items():
        assert config.alpha_pattern[name] == layer.lora_alpha["default"] == 8
        assert layer.scaling["default"] == 8 / report.ranks[name]
    assert report.modules[name].old_alpha == 32


def test_training_continues_after_pruning(roberta_pair, token_batch):
    _, model = roberta_pair
    model.train()
    lorpa.prune(model, target_rank=3)
    trainable = [p for p in model.parameters() if p.requires_grad]
    lora_params = {n: p for n, p in model.named_parameters() if "lora_" in n}
    assert all(p.requires_grad and 3 in p.shape for p in lora_params.values())
    before = {n: p.detach().clone() for n, p in lora_params.items()}
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    loss = model(**token_batch, labels=torch.tensor([0, 1, 1])).loss
    loss.backward()
    assert all(p.grad is not None and p.grad.shape == p.shape for p in lora_params.values())
    optimizer.step()
    assert all(not torch.equal(before[n], p) for n, p in lora_params.items())


def test_rewind_init_resets_survivors_to_injection_values():
    model = lorpa.get_peft_model(tiny_roberta(), with_lora(tiny_roberta()).peft_config["default"])
    initial = {n: [t.detach().clone() for t in factors(layer, "default")] for n, layer in lora_layers(model).items()}
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(1.0)  # stands in for training
    report = lorpa.prune(model, target_rank=4, rewind="init")
    for name, layer in lora_layers(model).items():
        kept = report.modules[name].kept
        lora_A, lora_B = factors(layer, "default")
        assert torch.equal(lora_A, initial[name][0][kept])
        assert torch.equal(lora_B, initial[name][1][:, kept])
    # the snapshot was pruned too, so a second rewind prune still lines up
    report = lorpa.prune(model, target_rank=2, rewind="init")
    assert all(m.new_rank == 2 for m in report.modules.values())


def test_wrapped_model_is_pruned_through_the_wrapper(roberta_pair, token_batch):
    _, model = roberta_pair
    expected = copy.deepcopy(model)
    lorpa.prune(expected, target_rank=4)
    report = lorpa.prune(torch.nn.DataParallel(model), target_rank=4)
    assert set(report.ranks.values()) == {4}
    assert torch.equal(logits(model, token_batch), logits(expected, token_batch))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"target_rank": 4, "ratio": 0.5}, "exactly one of target_rank"),
        ({}, "exactly one of target_rank"),
        ({"ratio": 1.0}, r"ratio must be in \[0, 1\)"),
        ({"ratio": -0.1}, r"ratio must be in \[0, 1\)"),
        ({"target_rank": 17}, "exceeds the rank"),
        ({"target_rank": 0}, "target_rank must be an integer"),
        ({"ratio": 0.5, "score": "l2"}, "unknown score"),
        ({"ratio": 0.5, "scope": "layer"}, "unknown scope"),
        ({"ratio": 0.5, "alpha": -1}, "alpha must be"),
        ({"ratio": 0.5, "min_rank": 0}, "min_rank must be"),
        ({"ratio": 0.5, "rewind": "init"}, "injection-time values"),
        ({"ratio": 0.5, "rewind": "late"}, "unknown rewind"),
    ],
)
def test_bad_arguments_raise_and_leave_the_model_unchanged(roberta_pair, kwargs, message):
    _, model = roberta_pair
    state, config = snapshot(model)
    with pytest.raises(ValueError, match=message):
        lorpa.prune(model, **kwargs)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert model.peft_config["default"] == config


def test_elementwise_on_non_square_layer_leaves_the_model_unchanged():
    model = with_lora(tiny_roberta(), target_modules=["query", "intermediate.dense"])
    state, _ = snapshot(model)
    with pytest.raises(ValueError, match="in_features == out_features"):
        lorpa.prune(model, ratio=0.5, score="elementwise")
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_model_without_lora_layers_is_rejected():
    with pytest.raises(ValueError, match="PeftModel"):
        lorpa.prune(tiny_roberta(), ratio=0.5)
    with pytest.raises(ValueError, match="no LoRA layers"):
        lorpa.rank_scores(tiny_roberta())
