"""Lines that dependencies log at import or load time never stand ahead of a command's one-line error."""

import logging
import os
import sys
from pathlib import Path

import pytest

import lorpa  # noqa: F401  (its import sets the loggers' levels)

import processes

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("logger", ["bitsandbytes.backends.cpu.ops", "kernels._internals.hf_hub"])
def test_dependency_loggers_keep_their_errors_only(logger):
    assert logging.getLogger(logger).getEffectiveLevel() == logging.ERROR


def test_a_refusal_is_one_line_with_the_qlora_extra_offline(tmp_path):
    """bitsandbytes (the qlora extra) looks for a hub kernel through `kernels` when peft imports it; offline, on CPUs
    with AVX-512 BF16, both log a warning. The refusal must still be the only line on stderr."""
    pytest.importorskip("bitsandbytes", reason="the qlora extra is not installed")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = processes.run([sys.executable, ROOT / "run_glue.py", "--method", "bogus", "--model_name_or_path", "m",
                          "--task_name", "rte", "--output_dir", tmp_path / "out"], timeout=120, env=env, cwd=ROOT)
    assert done.returncode == 2
    assert done.stderr == "error: unknown method 'bogus'; choose one of lorpa, lora, full, adalora\n"
    assert not (tmp_path / "out").exists()
