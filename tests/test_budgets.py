"""Choosing the size and serving the result: energy thresholds, a serving cap, rank multiples, the tolerance
search, the spectrum inspector, folded scalings and the engine check."""

import json
import math
import sys
import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, convert_to_lora, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

import lorpa
from lorpa.budgets import choose
from lorpa.check_adapter import check_adapter
from lorpa.check_adapter import main as check_main
from lorpa.cli import run_cli
from lorpa.engines import vllm_max_lora_rank
from lorpa.inspect import inspect_adapter
from lorpa.inspect import main as inspect_main
from lorpa.layers import lora_layers
from lorpa.options import PruneOptions
from lorpa.prune_adapter import main as prune_main
from lorpa.prune_adapter import prune_saved_adapter
from lorpa.tolerance import search_budget

from conftest import tiny_bart, with_lora


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32)
    return LlamaForCausalLM(config).eval()


def llama_lora(r=12, seed=1, **kwargs):
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules="all-linear", **kwargs)
    return get_peft_model(tiny_llama(), config).eval()


def decaying_lora(r=12):
    """Spectra that fall at a different rate in every module (random LoRA factors have flat ones)."""
    model = llama_lora(r=r)
    with torch.no_grad():
        for index, layer in enumerate(lora_layers(model).values()):
            decay = 0.45 + 0.04 * index
            layer.lora_A["default"].weight *= (decay ** torch.arange(r, dtype=torch.float32))[:, None]
    return model


def spectra(model):
    return {n: torch.linalg.svdvals(layer.get_delta_weight("default").detach().double())
            for n, layer in lora_layers(model).items()}


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.95, 0.99])
def test_an_energy_threshold_keeps_the_ranks_peft_convert_to_lora_keeps(energy):
    model = with_lora(tiny_bart(), r=12, task_type="SEQ_2_SEQ_LM")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft_config, _ = convert_to_lora(model, rank=energy)
    report = lorpa.prune(model, energy=energy, score="svd")
    peft_ranks = {name: peft_config.rank_pattern.get(name, peft_config.r) for name in report.ranks}
    assert report.ranks == peft_ranks
    assert len(set(report.ranks.values())) > 1  # the thresholds give the modules different ranks


def test_a_global_energy_threshold_is_one_cut_over_all_modules_and_max_rank_caps_it():
    sigma = {n: s[:12] * 2.0 for n, s in spectra(decaying_lora()).items()}  # scaling alpha / r = 2
    report = lorpa.prune(decaying_lora(), energy=0.9, score="svd", scope="global")
    energies = torch.cat([s.square() for s in sigma.values()])
    kept = sum(float(sigma[n][: report.ranks[n]].square().sum()) for n in sigma)
    smallest = min(float(sigma[n][report.ranks[n] - 1]) for n in sigma)  # the weakest component kept anywhere
    assert kept >= 0.9 * float(energies.sum()) - 1e-9
    assert kept - smallest**2 < 0.9 * float(energies.sum())  # without the weakest kept one, the threshold fails
    cap = max(report.ranks.values()) - 2
    capped = lorpa.prune(decaying_lora(), energy=0.9, score="svd", scope="global", max_rank=cap)
    assert max(capped.ranks.values()) <= cap
    # the energy the cap withheld came from other modules
    assert sum(capped.ranks.values()) > sum(report.ranks.values())
    held = sum(float(sigma[n][: capped.ranks[n]].square().sum()) for n in sigma)
    assert held >= 0.9 * float(energies.sum()) - 1e-9


def test_a_global_budget_honours_max_rank_and_rank_multiple():
    report = lorpa.prune(llama_lora(r=16), target_rank=6, score="svd", scope="global", max_rank=8, rank_multiple=2,
                         min_rank=2)
    ranks = report.ranks.values()
    assert sum(ranks) <= 6 * len(report.ranks) and sum(ranks) >= 6 * len(report.ranks) - 2
    assert max(ranks) <= 8 and min(ranks) >= 2 and all(r % 2 == 0 for r in ranks)
    plain = lorpa.prune(llama_lora(r=16), target_rank=6, score="svd", scope="global")
    assert max(plain.ranks.values()) > 8  # the cap changed something
    with pytest.raises(ValueError, match="max_rank .* must be a multiple of rank_multiple"):
        lorpa.prune(llama_lora(), target_rank=4, score="svd", scope="global", max_rank=5, rank_multiple=2)
    with pytest.raises(ValueError, match="energy needs a score whose components carry an energy"):
        lorpa.prune(llama_lora(), energy=0.9, score="magnitude")


def test_blocks_of_a_global_budget_match_the_plain_ranking_for_a_multiple_of_one():
    scores = {"a": torch.tensor([5.0, 1.0, 3.0]), "b": torch.tensor([4.0, 4.0, 0.5]), "c": torch.tensor([2.0])}
    kept = choose(scores, PruneOptions(total_rank=4, scope="global"))
    # min_rank 1 each, then b's 4
    assert {n: sorted(i.tolist()) for n, i in kept.items()} == {"a": [0], "b": [0, 1], "c": [0]}
    kept = choose(scores, PruneOptions(total_rank=5, max_rank=1, scope="global"))
    # the cap leaves the budget unspent
    assert {n: sorted(i.tolist()) for n, i in kept.items()} == {"a": [0], "b": [0], "c": [0]}
    kept = choose(scores, PruneOptions(total_rank=5, rank_multiple=2, scope="global"))
    assert {n: sorted(i.tolist()) for n, i in kept.items()} == {"a": [0, 2], "b": [0, 1], "c": [0]}


def test_the_tolerance_search_keeps_the_smallest_budget_within_it_and_records_every_candidate():
    scores = {budget: 80.0 - max(0, 40 - budget) * 0.1 for budget in range(1, 65)}  # flat above 40, then falling
    evaluated = []

    def evaluate(budget):
        evaluated.append(budget)
        return lorpa.tolerance.Candidate(budget, 10 * budget, scores[budget])

    search = search_budget(evaluate, 4, 64, 64, 640, reference=80.0, tolerance=0.5)
    assert search.kept == 35  # 80 − 0.5 at 35 components, 79.4 at 34
    assert [c.total_rank for c in search.candidates] == evaluated and len(evaluated) <= math.ceil(math.log2(61)) + 1
    assert all(c.score == scores[c.total_rank] for c in search.candidates)


def test_prune_to_tolerance_on_a_model_keeps_the_smallest_candidate_within_it():
    model = decaying_lora(r=8)
    inputs = torch.randint(0, 64, (4, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference_logits = model(inputs).logits

    def agreement(m):  # a score in points: 100 − relative output error × 100
        with torch.no_grad():
            return 100 - 100 * float(torch.linalg.norm(m(inputs).logits - reference_logits)
                                     / torch.linalg.norm(reference_logits))

    report, search = lorpa.prune_to_tolerance(model, agreement, 2.0, score="svd")
    assert sum(report.ranks.values()) == search.kept < search.full_rank
    within = [c for c in search.candidates if c.score >= search.reference - 2.0]
    assert search.kept == min(c.total_rank for c in within)
    assert all(c.score < search.reference - 2.0 for c in search.candidates if c.total_rank < search.kept)
    assert agreement(model) >= search.reference - 2.0 - 1e-6  # the model left is the kept candidate


def save(model, folder):
    model.save_pretrained(folder)
    return folder


def test_inspect_matches_an_in_memory_svd(tmp_path, capsys):
    model = llama_lora(use_rslora=True)
    folder = save(model, tmp_path / "adapter")
    result = inspect_adapter(folder)
    for name, sigma in spectra(model).items():
        row = result["modules"][name]
        assert torch.allclose(torch.tensor(row["singular_values"], dtype=torch.float64), sigma[:12], rtol=1e-4,
                              atol=1e-6)
        energy = sigma[:12].square()
        assert row["energy_kept"]["4"] == pytest.approx(float(energy[:4].sum() / energy.sum()), rel=1e-5)
    for energy in ("0.9", "0.99"):
        pruned = lorpa.prune(llama_lora(use_rslora=True), energy=float(energy), score="svd", scope="global")
        assert result["totals"]["global_energy"][energy]["total_rank"] == sum(pruned.ranks.values())
    eight = result["totals"]["module_rank"]["8"]
    assert eight["parameters"] == sum(8 * (layer.in_features + layer.out_features)
                                      for layer in lora_layers(model).values())
    assert run_cli(inspect_main, [str(folder), "--json", "--plot", str(tmp_path / "spectra.png")]) == 0
    assert json.loads(capsys.readouterr().out) == json.loads(json.dumps(result))  # stdout is the JSON alone
    assert (tmp_path / "spectra.png").read_bytes()[:4] == b"\x89PNG"


def engine_outputs(folder, inputs):
    """A reference loader as an engine that ignores alpha_pattern loads the adapter: each module's rank from its
    tensor shapes, one scaling for all from the config's top-level r and lora_alpha."""
    config = json.loads((folder / "adapter_config.json").read_text())
    scale = config["lora_alpha"] / (math.sqrt(config["r"]) if config.get("use_rslora") else config["r"])
    tensors = load_file(folder / "adapter_model.safetensors")
    base = tiny_llama()
    modules = dict(base.named_modules())
    for key, lora_A in tensors.items():
        if key.endswith("lora_A.weight"):
            name = key.removeprefix("base_model.model.").removesuffix(".lora_A.weight")
            lora_B = tensors[key.replace("lora_A", "lora_B")]
            with torch.no_grad():
                modules[name].weight += scale * (lora_B.float() @ lora_A.float())
    with torch.no_grad():
        return base(inputs).logits


@pytest.mark.parametrize("rslora", [False, True])
def test_a_folded_adapter_is_served_alike_by_peft_and_by_an_engine_that_ignores_alpha_pattern(tmp_path, rslora):
    inputs = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(1))
    unfolded, folded = llama_lora(use_rslora=rslora), llama_lora(use_rslora=rslora)
    lorpa.prune(unfolded, target_rank=4, score="svd", scope="global", alpha=3.0)
    report = lorpa.prune(folded, target_rank=4, score="svd", scope="global", alpha="fold")
    assert report.folded and all(m.new_alpha == m.new_rank for m in report.modules.values())
    with torch.no_grad():
        expected = llama_lora(use_rslora=rslora)
        lorpa.prune(expected, target_rank=4, score="svd", scope="global")  # keep_scaling: the same update as fold
        expected_logits = expected(inputs).logits
    folder = save(folded, tmp_path / "folded")
    config = json.loads((folder / "adapter_config.json").read_text())
    # scaling 1 everywhere; r is the smallest --max-lora-rank vLLM accepts that holds the largest module rank
    largest = max(report.ranks.values())
    assert config["r"] == config["lora_alpha"] == vllm_max_lora_rank(largest) >= largest
    assert config["use_rslora"] is False
    reloaded = PeftModel.from_pretrained(tiny_llama(), folder).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(inputs).logits, expected_logits, atol=1e-5)
    assert torch.allclose(engine_outputs(folder, inputs), expected_logits, atol=1e-5)
    assert all(not check.problems for check in check_adapter(folder)[0])
    assert run_cli(check_main, [str(folder)]) == 0

    mis_scaled = save(unfolded, tmp_path / "unfolded")  # one pruned alpha over several ranks
    checks, _ = check_adapter(mis_scaled)
    assert any("by an engine that ignores alpha_pattern" in " ".join(c.problems) for c in checks)
    assert run_cli(check_main, [str(mis_scaled)]) == 1
    peft_logits = PeftModel.from_pretrained(tiny_llama(), mis_scaled).eval()(inputs).logits
    # the check is right to flag it
    assert not torch.allclose(engine_outputs(mis_scaled, inputs), peft_logits, atol=1e-4)


def test_folding_a_saved_adapter_gives_the_tensors_folding_in_memory_gives(tmp_path):
    folder = save(llama_lora(), tmp_path / "adapter")
    prune_saved_adapter(folder, tmp_path / "out", energy=0.9, score="svd", scope="global", max_rank=6, alpha="fold")
    model = llama_lora()
    lorpa.prune(model, energy=0.9, score="svd", scope="global", max_rank=6, alpha="fold")
    save(model, tmp_path / "memory")
    files, memory = (load_file(tmp_path / "out/adapter_model.safetensors"),
                     load_file(tmp_path / "memory/adapter_model.safetensors"))
    assert files.keys() == memory.keys() and all(torch.allclose(files[k], memory[k], atol=1e-6) for k in files)
    written = json.loads((tmp_path / "out/adapter_config.json").read_text())
    assert written["rank_pattern"] == json.loads((tmp_path / "memory/adapter_config.json").read_text())["rank_pattern"]


def test_the_tolerance_search_of_a_saved_adapter_runs_the_evaluation_command_on_every_candidate(tmp_path, capsys):
    folder = save(llama_lora(r=8), tmp_path / "adapter")
    scorer = tmp_path / "score.py"  # scores an adapter by its total rank: 60 + total/4, so 0.5 points = 2 components
    scorer.write_text("import json, sys\nconfig = json.load(open(sys.argv[1] + '/adapter_config.json'))\n"
                      "pattern = config.get('rank_pattern') or {}\n"
                      "total = sum(pattern.values()) if pattern else config['r'] * 14\n"
                      "print('score', 60 + total / 4)\n")
    argv = [str(folder), str(tmp_path / "out"), "--tolerance", "0.5", "--score", "svd",
            "--evaluate", f"{sys.executable} {scorer} {{adapter}}"]
    assert run_cli(prune_main, argv) == 0
    search = json.loads((tmp_path / "out/tolerance_search.json").read_text())
    assert search["reference"] == 60 + 8 * 14 / 4 and search["kept"] == 8 * 14 - 2
    assert sum(
        json.loads((tmp_path / "out/adapter_config.json").read_text())["rank_pattern"].values()
    ) == search["kept"]
    assert "kept total rank 110 of 112" in capsys.readouterr().out
    assert not list(tmp_path.glob(".out.candidate-*"))  # every candidate folder was removed


@pytest.mark.parametrize("argv, expected", [
    (["--tolerance", "0.5"], "--tolerance needs --evaluate COMMAND"),
    (["--evaluate", "true"], "--evaluate scores the candidates of --tolerance"),
    (["--energy", "0.9", "--score", "magnitude"], "energy needs a score whose components carry an energy"),
    (["--energy", "1.5", "--score", "svd"], "energy must be in (0, 1]"),
    (["--total_rank", "8"], "total_rank is a budget over all modules"),
    (["--target_rank", "2", "--alpha", "folded"], "--alpha must be keep_scaling, fold or a positive number"),
    (["--tolerance", "0.5", "--evaluate", "false {adapter}"], "--evaluate exited 1"),
    ([], "give one of --target_rank, --ratio, --energy, --total_rank or --tolerance"),
])
def test_bad_sizing_options_fail_in_one_line_and_write_nothing(tmp_path, capsys, argv, expected):
    folder = save(llama_lora(r=4), tmp_path / "adapter")
    assert run_cli(prune_main, [str(folder), str(tmp_path / "out"), *argv]) == 2
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and expected in errors[0], errors
    assert not (tmp_path / "out").exists() and sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_check_adapter_names_shape_mismatches(tmp_path, capsys):
    folder = save(llama_lora(r=4), tmp_path / "adapter")
    config = json.loads((folder / "adapter_config.json").read_text())
    config["rank_pattern"] = {"model.layers.0.self_attn.q_proj": 8}
    (folder / "adapter_config.json").write_text(json.dumps(config))
    assert run_cli(check_main, [str(folder)]) == 1
    out = capsys.readouterr().out
    assert "model.layers.0.self_attn.q_proj: rank 4" in out and "the tensors have rank 4, the config gives 8" in out
