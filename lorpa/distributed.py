"""Leaving a `torch.distributed` process group without a teardown deadlock.

A DDP wrapper's reducer holds a reference to the process group. When the wrapper outlives
`destroy_process_group()`, the group is destroyed later by the reducer's destructor, which runs with
the GIL held; gloo's destructor joins its worker threads, and a worker still releasing the tensors of
the last collective needs the GIL to do so: both wait forever. So wrappers are released while the
group is alive, and the group's last reference is its Python handle, whose destructor releases the GIL.
"""

from __future__ import annotations

import gc
import sys


def release_training_wrapper(trainer) -> None:
    """Drop the DDP / accelerate wrapper a Trainer keeps after `train()`; `trainer.model` stays, and
    evaluating, predicting or saving with the trainer still works (they need no wrapper)."""
    trainer.accelerator.free_memory()
    trainer.model_wrapped = trainer.model


def leave_process_group() -> None:
    """Destroy the default process group, if any, after every wrapper that references it is gone.

    Only after success: leaving while a failed peer is mid-collective can hang.
    """
    distributed = sys.modules.get("torch.distributed")  # never imports torch for commands that don't use it
    if distributed is None or not distributed.is_available() or not distributed.is_initialized():
        return
    gc.collect()  # wrappers held in reference cycles (a Trainer and its callbacks) go while the group is alive
    distributed.destroy_process_group()
