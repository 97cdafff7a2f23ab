"""The golden set of the prune: every score × scope × budget kind × alpha mode (and the other options) on tiny
fixtures, pruned in memory (`lorpa.prune`) and from files (`lorpa.prune_adapter`), described to the bit: kept
indices, ranks, alphas, errors, the config written and a checksum of every tensor.

`tests/test_golden.py` recomputes it and compares with `tests/data/golden_prune.json`, which was written by the
code the redesign replaced; `python tests/golden_prune.py --write` writes it anew (only when a change of the
numbers is intended, and say so).
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import RobertaConfig, RobertaForSequenceClassification

import lorpa
from lorpa.layers import lora_layers
from lorpa.prune_adapter import prune_saved_adapter

GOLDEN_FILE = Path(__file__).parent / "data" / "golden_prune.json"
SQUARE = ["query", "value"]  # every module square: the elementwise score is defined
RECTANGULAR = ["query", "value", "intermediate.dense", "output.dense"]  # 32 → 48 and 48 → 32 as well
ALPHAS = ["keep_scaling", "fold", 24]


def tiny_model(targets, rslora=False, seed=0):
    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=80, num_labels=2, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0)
    base = RobertaForSequenceClassification(config).eval()
    torch.manual_seed(seed + 1)
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, init_lora_weights=False, task_type="SEQ_CLS",
                      target_modules=targets, use_rslora=rslora)
    return lorpa.get_peft_model(base, lora).eval()


def batch():
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 120, (3, 11), generator=generator)
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[1, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([0, 1, 1])}


def prepared(model):
    """Two optimizer-free sensitivity updates (so `sensitivity` has its state) and a calibration (so every
    score's report holds its output error, and `activation` can run)."""
    for _ in range(2):
        model.zero_grad()
        model(**batch()).loss.backward()
        lorpa.update_sensitivity(model)
    model.zero_grad()
    lorpa.calibrate(model, [{k: v for k, v in batch().items() if k != "labels"}])
    return model


def digest(tensor: torch.Tensor) -> str:
    return hashlib.sha256(
        tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    ).hexdigest()[:16]


def describe_report(report) -> dict:
    fields = {key: value for key, value in report.to_dict().items() if key != "modules"}
    modules = {}
    for name, m in report.modules.items():
        modules[name] = {"old_rank": m.old_rank, "new_rank": m.new_rank, "old_alpha": m.old_alpha,
                         "new_alpha": m.new_alpha, "kept": ",".join(map(str, m.kept)),
                         "scores": hashlib.sha256(json.dumps(m.scores).encode()).hexdigest()[:16],
                         "relative_error": m.relative_error, "output_error": m.output_error}
    return {**fields, "modules": modules}


def describe_config(config) -> dict:
    values = config if isinstance(config, dict) else vars(config)
    return {key: values.get(key) for key in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "use_rslora")}


def cases():
    """(name, targets, rslora, options, from_files) for every combination the golden set covers."""
    found = []
    for score in ("magnitude", "elementwise", "random", "svd", "sensitivity", "activation"):
        rotated = score in ("svd", "activation")
        targets = SQUARE if score == "elementwise" else RECTANGULAR
        files = score in ("magnitude", "elementwise", "random", "svd")
        for scope in ("module", "global"):
            budgets = [{"target_rank": 5}, {"ratio": 0.75}]
            budgets += [{"total_rank": 37}] if scope == "global" else []
            budgets += [{"energy": 0.9}] if rotated else []
            for budget in budgets:
                for alpha in ALPHAS:
                    options = {**budget, "score": score, "scope": scope, "alpha": alpha, "seed": 3}
                    found.append((options, targets, False, files))
        extra = [{"target_rank": 6, "min_rank": 2, "max_rank": 8, "rank_multiple": 2, "scope": "global"},
                 {"target_rank": 4, "rank_multiple": 4, "scope": "module"}]
        if not rotated:
            extra.append({"target_rank": 5, "rewind": "init", "scope": "module"})
        if rotated:
            extra += [{"total_rank": 30, "global_norm": "relative", "scope": "global"},
                      {"energy": 0.8, "global_norm": "relative", "scope": "global", "alpha": "fold"}]
        if score == "svd":
            extra.append({"target_rank": 5, "svd_split": "orthonormal_a", "scope": "global", "alpha": "fold"})
        for options in extra:
            rewinds = options.get("rewind") == "init"
            found.append(({"score": score, "seed": 3, **options}, targets, False, files and not rewinds))
        found.append(({"score": score, "target_rank": 5, "seed": 3}, targets, True, files))  # rsLoRA
    return found


def case_name(options: dict, rslora: bool) -> str:
    return ",".join(f"{k}={v}" for k, v in options.items()) + (",rslora" if rslora else "")


def golden() -> dict:
    torch.set_num_threads(1)
    models = {}
    results = {}
    with tempfile.TemporaryDirectory() as root:
        for options, targets, rslora, files in cases():
            key = (tuple(targets), rslora)
            if key not in models:
                model = prepared(tiny_model(targets, rslora))
                adapter = Path(root, f"adapter{len(models)}")
                model.save_pretrained(adapter)
                models[key] = (model, adapter)
            model, adapter = models[key]
            name = case_name(options, rslora)
            pruned = copy.deepcopy(model)
            report = lorpa.prune(pruned, **options)
            tensors = {name: (layer.lora_A["default"].weight, layer.lora_B["default"].weight)
                       for name, layer in lora_layers(pruned).items()}
            entry = {"memory": {"report": describe_report(report),
                                "config": describe_config(pruned.peft_config["default"]),
                                "tensors": {n: [digest(a), digest(b)] for n, (a, b) in tensors.items()}}}
            if files:
                output = Path(root, "out")
                report = prune_saved_adapter(adapter, output, overwrite=True, **options)
                saved = load_file(output / "adapter_model.safetensors")
                config = json.loads((output / "adapter_config.json").read_text())
                entry["files"] = {"report": describe_report(report), "config": describe_config(config),
                                  "tensors": {k: digest(v) for k, v in sorted(saved.items())},
                                  "report_file": (json.loads((output / "prune_report.json").read_text())
                                                  == report.to_dict())}
            results[name] = entry
    text = (json.dumps(results).replace("base_model.model.roberta.encoder.layer.", "")
            .replace("roberta.encoder.layer.", ""))
    return json.loads(text)  # as the file holds it: tuples as lists, float keys as strings, short module names


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--write", action="store_true", help=f"write {GOLDEN_FILE}")
    args = parser.parse_args()
    values = golden()
    if args.write:
        GOLDEN_FILE.parent.mkdir(exist_ok=True)
        lines = [f"{json.dumps(name)}: {json.dumps(entry, sort_keys=True, separators=(',', ':'))}"
                 for name, entry in sorted(values.items())]
        GOLDEN_FILE.write_text("{\n" + ",\n".join(lines) + "\n}\n")  # one case a line
        print(f"wrote {len(values)} cases to {GOLDEN_FILE}")
    else:
        json.dump(values, sys.stdout)
