"""benchmarks/cuda_check.py, the script a GPU runs, cannot rot: its tiny-shape CPU run goes through every part."""

import json
import os
import sys
from pathlib import Path

import processes

ROOT = Path(__file__).resolve().parents[1]


def test_the_cuda_check_runs_every_part_on_tiny_shapes(tmp_path):
    output = tmp_path / "check.json"
    done = processes.run([sys.executable, ROOT / "benchmarks/cuda_check.py", "--tiny", "--json", output], timeout=300,
                         env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads(output.read_text())
    steps = results["step time, bf16"]
    assert set(steps) == {"LoRPA stage 1 (LoRA r=16)", "LoRPA stage 2 (16->4, reloaded)", "peft LoRA r=4"}
    assert all(figures["step_s"] > 0 for figures in steps.values()) and steps["peft LoRA r=4"]["ratio_to_lora"] == 1
    prune = results["prune time"]
    assert prune["svd: largest relative difference from peft"] < 1e-3  # the same update as peft's SVD conversion
    assert {"authors' prune() (square modules)", "lorpa.prune magnitude (all modules)",
            "lorpa.prune svd (all modules)"} <= set(prune)
    qlora = results["qlora"]
    assert "skipped" in qlora or (qlora["layer type"] == "peft.tuners.lora.bnb"
                                  and qlora["largest output difference after reload"] == 0)
    assert "1. training step" in done.stdout and "3. QLoRA round trip" in done.stdout
