"""One process of a 2-process gloo run, launched by test_activation.py through torchrun: calibrate on this
process's half of the batches, prune with the activation score in global scope, save the factors to
OUT/process<rank>.pt (and the token count the calibration reports to OUT/tokens.json from process 0)."""

import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

import lorpa
from lorpa.distributed import leave_process_group
from test_activation import anisotropic_batches, lora_model


def main(out: Path):
    torch.set_num_threads(1)
    # every collective fails well within the test's limit
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank = dist.get_rank()
    model = lora_model()
    tokens = lorpa.calibrate(model, anisotropic_batches()[rank::2])
    lorpa.prune(model, target_rank=2, score="activation", scope="global")
    torch.save({n: p.detach() for n, p in model.named_parameters() if "lora_" in n}, out / f"process{rank}.pt")
    if rank == 0:
        (out / "tokens.json").write_text(json.dumps({"tokens": tokens}))
    del model
    leave_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
