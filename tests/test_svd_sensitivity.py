"""The scores beyond the paper: singular-basis pruning, tracked sensitivity, and the relative error."""

import copy
import warnings

import pytest
import torch
from peft import PeftModel, convert_to_lora

import lorpa
from lorpa.layers import factors, lora_layers
from lorpa.lowrank import relative_error, singular_factors
from lorpa.sensitivity import SensitivityCallback, restore_sensitivity

from conftest import tiny_bart, tiny_roberta, with_lora


def dense_deltas(model):
    return {n: layer.get_delta_weight("default").detach().double() for n, layer in lora_layers(model).items()}


def truncated(delta, k):
    u, s, vh = torch.linalg.svd(delta, full_matrices=False)
    return u[:, :k] @ torch.diag(s[:k]) @ vh[:k]


def relative(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


@pytest.mark.parametrize("split", ["balanced", "orthonormal_a"])
def test_svd_keeps_the_truncated_svd_of_every_update(split):
    model = with_lora(tiny_bart(), r=12, task_type="SEQ_2_SEQ_LM")  # includes cross-attention
    before = dense_deltas(model)
    report = lorpa.prune(model, target_rank=5, score="svd", svd_split=split)
    after = dense_deltas(model)
    for name, delta in before.items():
        assert report.modules[name].new_rank == 5 and report.modules[name].kept == [0, 1, 2, 3, 4]
        assert relative(after[name], truncated(delta, 5)) < 1e-5
        singular_values = torch.linalg.svdvals(delta)
        scaling = lora_layers(model)[name].scaling["default"]
        torch.testing.assert_close(torch.tensor(report.modules[name].scores[:12]).double(),
                                   singular_values[:12], rtol=1e-4, atol=1e-6)
        assert scaling == pytest.approx(2.0)  # alpha/r kept
        assert report.modules[name].relative_error == pytest.approx(relative(after[name], delta), rel=1e-6)


def test_svd_at_the_end_keeps_what_peft_convert_to_lora_keeps():
    """peft's own SVD truncation of an adapter (no retraining) is the competitor of a prune at the end:
    the same update per module, computed here without forming the out x in matrix."""
    model = with_lora(tiny_bart(), r=12, task_type="SEQ_2_SEQ_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft warns that converting a LoRA adapter to LoRA is unusual
        peft_config, peft_state = convert_to_lora(model, rank=5)
    assert peft_config.lora_alpha == peft_config.r == 5  # its scaling is 1
    lorpa.prune(model, target_rank=5, score="svd")
    for name, delta in dense_deltas(model).items():
        key = f"base_model.model.{name}"
        peft_delta = peft_state[f"{key}.lora_B.weight"].double() @ peft_state[f"{key}.lora_A.weight"].double()
        assert relative(delta, peft_delta) < 1e-5


def test_svd_splits_put_the_singular_values_where_they_say():
    torch.manual_seed(0)
    A, B = torch.randn(6, 20), torch.randn(30, 6)
    new_A, new_B, sigma = singular_factors(A, B, "orthonormal_a")
    torch.testing.assert_close(new_A @ new_A.T, torch.eye(6), atol=1e-5, rtol=0)
    torch.testing.assert_close(new_B.norm(dim=0), sigma, rtol=1e-5, atol=1e-6)
    balanced_A, balanced_B, _ = singular_factors(A, B, "balanced")
    torch.testing.assert_close(balanced_A.norm(dim=1), balanced_B.norm(dim=0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(balanced_B @ balanced_A, B @ A, rtol=1e-5, atol=1e-5)
    assert torch.all(sigma[:-1] >= sigma[1:])


def test_svd_to_full_rank_changes_no_output(roberta_pair, token_batch):
    _, model = roberta_pair
    with torch.no_grad():
        before = model(**token_batch).logits
    report = lorpa.prune(model, target_rank=16, score="svd")
    with torch.no_grad():
        after = model(**token_batch).logits
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)
    assert max(m.relative_error for m in report.modules.values()) < 1e-5


@pytest.mark.parametrize("kwargs", [
    {"target_rank": 6}, {"target_rank": 6, "score": "svd"}, {"target_rank": 6, "alpha": 3.0},
    {"ratio": 0.5, "scope": "global"}, {"target_rank": 6, "rewind": "init"}, {"target_rank": 6, "alpha": "fold"},
    {"target_rank": 15},  # one small component dropped: float32 Grams must still give its small error
])
def test_relative_error_matches_a_dense_computation(kwargs):
    model = lorpa.get_peft_model(tiny_roberta(), copy.deepcopy(with_lora(tiny_roberta()).peft_config["default"]))
    torch.manual_seed(3)
    for layer in lora_layers(model).values():  # trained-looking factors: both non-zero
        for weight in factors(layer, "default"):
            weight.data.normal_()
    before = dense_deltas(model)
    report = lorpa.prune(model, **kwargs)
    after = dense_deltas(model)
    for name, module in report.modules.items():
        assert module.relative_error == pytest.approx(relative(after[name], before[name]), rel=1e-6)
    assert report.mean_relative_error == pytest.approx(
        sum(m.relative_error for m in report.modules.values()) / len(report.modules))


def test_relative_error_of_an_untouched_zero_update_is_zero():
    A, B = torch.randn(4, 8), torch.zeros(8, 4)
    assert relative_error((A, B, 2.0), (A[:2], B[:, :2], 2.0)) == 0.0


def test_global_svd_ranks_singular_values_across_modules_and_honours_min_rank(roberta_pair):
    _, model = roberta_pair
    layers = lora_layers(model)
    # make one module's update much larger, so a global budget favours it
    big = next(iter(layers))
    factors(layers[big], "default")[1].data *= 10
    singular = {n: torch.linalg.svdvals(d) for n, d in dense_deltas(model).items()}
    report = lorpa.prune(model, target_rank=4, score="svd", scope="global", min_rank=2)
    assert sum(report.ranks.values()) == 4 * len(layers)
    assert min(report.ranks.values()) >= 2 and report.ranks[big] > 4
    pooled = sorted((float(s), n) for n, values in singular.items() for s in values[2:])[::-1]
    extra = 4 * len(layers) - 2 * len(layers)
    expected = {n: 2 + sum(1 for _, owner in pooled[:extra] if owner == n) for n in singular}
    assert report.ranks == expected


def test_svd_adapter_reloads_with_plain_peft(tmp_path, token_batch):
    base = tiny_roberta()
    model = with_lora(copy.deepcopy(base))
    lorpa.prune(model, target_rank=3, score="svd", scope="global")
    model.save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(copy.deepcopy(base), tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(model(**token_batch).logits, reloaded(**token_batch).logits)


def test_svd_refuses_rewind_to_init(roberta_pair):
    _, model = roberta_pair
    with pytest.raises(ValueError, match="rewind='init' cannot follow score='svd'"):
        lorpa.prune(model, target_rank=4, score="svd", rewind="init")


def loss_and_backward(model, batch, labels):
    model.zero_grad()
    loss = torch.nn.functional.cross_entropy(model(**batch).logits, labels)
    loss.backward()


def test_sensitivity_is_the_smoothed_first_order_importance(roberta_pair, token_batch):
    _, model = roberta_pair
    model.train()
    labels = torch.tensor([0, 1, 1])
    beta = 0.7
    expected = {}
    for step in range(3):
        loss_and_backward(model, token_batch, labels)
        for name, layer in lora_layers(model).items():
            A, B = (f.detach() for f in factors(layer, "default"))
            grad_A, grad_B = (f.grad for f in factors(layer, "default"))
            importance = torch.tensor([
                sum(abs(float(A[i, j]) * float(grad_A[i, j])) for j in range(A.shape[1]))
                + sum(abs(float(B[j, i]) * float(grad_B[j, i])) for j in range(B.shape[0]))
                for i in range(A.shape[0])
            ])
            expected[name] = beta * expected.get(name, torch.zeros(16)) + (1 - beta) * importance
        lorpa.update_sensitivity(model, beta)
        with torch.no_grad():  # a step of plain SGD, so the next gradient differs
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.1 * p.grad
    scores = lorpa.rank_scores(model, "sensitivity")
    for name, values in expected.items():
        torch.testing.assert_close(scores[name].double(), values.double(), rtol=1e-5, atol=1e-9)

    report = lorpa.prune(model, target_rank=5, score="sensitivity")
    for name, module in report.modules.items():
        assert module.kept == sorted(torch.topk(scores[name], 5).indices.tolist())
        # the average of the survivors is kept for a later prune
        torch.testing.assert_close(lorpa.rank_scores(model, "sensitivity")[name], scores[name][module.kept])


def test_sensitivity_without_tracking_names_the_callback(roberta_pair):
    _, model = roberta_pair
    with pytest.raises(ValueError, match="SensitivityCallback"):
        lorpa.prune(model, target_rank=4, score="sensitivity")


def test_sensitivity_state_round_trips_through_a_checkpoint_state(roberta_pair, token_batch):
    _, model = roberta_pair
    loss_and_backward(model.train(), token_batch, torch.tensor([0, 1, 0]))
    callback = SensitivityCallback(beta=0.5)
    callback.on_train_begin(None, None, None, model=model)
    callback.on_pre_optimizer_step(None, None, None, model=model)
    stored = {"stateful_callbacks": {"SensitivityCallback": callback.state()}}
    fresh = copy.deepcopy(model)
    for layer in lora_layers(fresh).values():
        layer.__dict__.pop("_lorpa_sensitivity")
    assert restore_sensitivity(fresh, stored)
    original, restored = lorpa.rank_scores(model, "sensitivity"), lorpa.rank_scores(fresh, "sensitivity")
    assert all(torch.equal(original[n], restored[n]) for n in original)
    assert not restore_sensitivity(fresh, {"stateful_callbacks": {}})
