"""How many lines of `lorpa/` a prune runs through, traced on a tiny model: what a newcomer reads to follow it.

    python scripts/path_lines.py

Prints, for the paper's prune (magnitude score, one rank per module, in memory) and for every option together
(each score, budget and alpha mode, in memory and from files): the lines executed, and the lines of the functions
they belong to (docstrings and untaken branches included). Imports happen before tracing and are not counted.
"""

from __future__ import annotations

# First: importing lorpa keeps the lines dependencies log at import time (bitsandbytes' hub kernel) off stderr.
import lorpa

# isort: split

import ast
import copy
import sys
import tempfile
from pathlib import Path

import torch
from peft import LoraConfig
from transformers import RobertaConfig, RobertaForSequenceClassification

from lorpa.prune_adapter import prune_saved_adapter

PACKAGE = str(Path(lorpa.__file__).parent)
METHOD = [PACKAGE + "/harness/", PACKAGE + "/tasks/"]


def tiny_model(recorded: bool = True):
    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=48, max_position_embeddings=80, num_labels=2)
    lora = LoraConfig(r=16, lora_alpha=32, init_lora_weights=False, task_type="SEQ_CLS",
                      target_modules=["query", "value", "intermediate.dense", "output.dense"])
    model = lorpa.get_peft_model(RobertaForSequenceClassification(config).eval(), lora)
    if not recorded:  # the paper's prune: no sensitivity, no calibration
        return model
    ids = torch.randint(3, 120, (3, 11), generator=torch.Generator().manual_seed(2))
    model(input_ids=ids, labels=torch.tensor([0, 1, 1])).loss.backward()
    lorpa.update_sensitivity(model)
    model.zero_grad()
    lorpa.calibrate(model, [{"input_ids": ids}])
    return model


def traced(work) -> set[tuple[str, int]]:
    lines = set()

    def tracer(frame, event, arg):
        path = frame.f_code.co_filename
        if not path.startswith(PACKAGE) or any(path.startswith(skip) for skip in METHOD):
            return None
        if event == "line":
            lines.add((path, frame.f_lineno))
        return tracer

    sys.settrace(tracer)
    try:
        work()
    finally:
        sys.settrace(None)
    return lines


def function_lines(lines: set[tuple[str, int]]) -> tuple[int, int]:
    """(functions that ran, lines they span): outermost functions with an executed line."""
    spans = set()
    for path in {path for path, _ in lines}:
        hit = {line for p, line in lines if p == path}
        for node in ast.walk(ast.parse(Path(path).read_text())):
            if isinstance(node, ast.FunctionDef) and any(node.lineno <= line <= node.end_lineno for line in hit):
                spans.add((path, node.lineno, node.end_lineno))
    outer = [(p, a, b) for p, a, b in spans if not any(q == p and c <= a and b <= d and (c, d) != (a, b)
                                                       for q, c, d in spans)]
    return len(spans), sum(b - a + 1 for _, a, b in outer)


def main():
    torch.set_num_threads(1)
    model = tiny_model()
    every = [dict(target_rank=5), dict(ratio=0.5, scope="global"), dict(target_rank=5, alpha=8),
             dict(energy=0.9, score="svd", scope="global", global_norm="relative"),
             dict(target_rank=4, score="activation", alpha="fold", max_rank=6, rank_multiple=2),
             dict(total_rank=30, scope="global", score="sensitivity"),
             dict(target_rank=5, rewind="init", score="random", seed=1)]
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(f"{folder}/adapter")
        for options in (dict(target_rank=5), dict(target_rank=5, score="svd")):  # imports, before tracing
            lorpa.prune(copy.deepcopy(model), **options)
        prune_saved_adapter(f"{folder}/adapter", f"{folder}/warm", target_rank=5)
        plain = tiny_model(recorded=False)
        paper = traced(lambda: lorpa.prune(plain, lorpa.PruneOptions(target_rank=5)))
        memory = traced(lambda: [lorpa.prune(copy.deepcopy(model), **options) for options in every])
        files = traced(lambda: [prune_saved_adapter(f"{folder}/adapter", f"{folder}/out{i}", **options)
                                for i, options in enumerate([dict(target_rank=5, score="svd", scope="global"),
                                                             dict(ratio=0.5, score="magnitude", alpha="fold")])])
    for label, lines in (("the paper's prune", paper), ("every option in memory", memory), ("from files", files),
                         ("everything", paper | memory | files)):
        functions, span = function_lines(lines)
        print(f"{label:<24} {len(lines):4d} lines executed in {functions:3d} functions spanning {span} lines")


if __name__ == "__main__":
    main()
