"""Run a sweep's cells on this machine, N at a time.

Parallel cells never share a device: with GPUs each cell gets its own (`nproc` of them for DDP
cells) through CUDA_VISIBLE_DEVICES; on CPU each gets its share of the cores through
OMP_NUM_THREADS. A failing cell does not stop the others; the sweep ends with one summary. A cell
that reuses another's run as its stage 1 waits for it, while the other cells go on.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import InputError
from .cells import Cell, start


@dataclass
class SweepOutcome:
    finished: list[Cell] = field(default_factory=list)
    skipped: list[Cell] = field(default_factory=list)
    failed: list[tuple[Cell, int]] = field(default_factory=list)


def visible_devices(count: int) -> list[str]:
    """The GPUs this process may use, as CUDA_VISIBLE_DEVICES names them (ids or UUIDs)."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [device for device in listed.split(",") if device.strip()][:count]
    return [str(index) for index in range(count)]


def slot_environments(parallel: int, nproc: int, gpus: int) -> list[dict]:
    """One environment per concurrent cell: its own devices, or its share of the CPU threads."""
    if gpus:
        devices = visible_devices(gpus)
        if parallel * nproc > len(devices):
            raise InputError(f"--parallel {parallel} x --nproc {nproc} needs {parallel * nproc} GPUs, "
                             f"{len(devices)} visible; lower --parallel or --nproc")
        return [{"CUDA_VISIBLE_DEVICES": ",".join(devices[i * nproc:(i + 1) * nproc])} for i in range(parallel)]
    if "OMP_NUM_THREADS" in os.environ:  # the user's per-process choice
        threads = os.environ["OMP_NUM_THREADS"]
    else:
        threads = str(max(1, len(os.sched_getaffinity(0)) // (parallel * nproc)))
    return [{"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads} for _ in range(parallel)]


def clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """`[i/N]` lines with the elapsed time and an estimate of the time left from the cells run so far."""

    def __init__(self, cells: list[Cell], parallel: int):
        self.position = {cell.name: index for index, cell in enumerate(cells, 1)}
        self.total, self.parallel = len(cells), parallel
        self.started_at = time.monotonic()
        self.durations: list[float] = []

    def left(self, waiting: int, running: int) -> str:
        if not self.durations:
            return "time left unknown"
        mean = sum(self.durations) / len(self.durations)
        return f"~{clock(mean * (waiting + running / 2) / self.parallel)} left"

    def line(self, cell: Cell, event: str, waiting: int, running: int) -> str:
        elapsed = clock(time.monotonic() - self.started_at)
        return f"[{self.position[cell.name]}/{self.total}] {event} (elapsed {elapsed}, {self.left(waiting, running)})"


def next_cell(waiting: deque, running: list[Cell]) -> Cell | None:
    """The first waiting cell that waits for no other: a cell whose stage 1 another cell of the sweep
    trains starts after it, so that it can reuse the run (the LoRA twins come first in table order)."""
    pending = {cell.output_dir for cell in [*waiting, *running]}
    return next((cell for cell in waiting if cell.stage1_from not in pending), None)


def run_cells(cells: list[Cell], *, parallel: int, nproc: int, gpus: int, cwd: Path | None = None) -> SweepOutcome:
    """Run every unfinished cell, `parallel` at a time; skipped, finished and failed cells are returned."""
    slots = slot_environments(parallel, nproc, gpus)
    outcome, progress = SweepOutcome(), Progress(cells, parallel)
    waiting = deque()
    for cell in cells:
        if cell.finished():
            outcome.skipped.append(cell)
            print(f"[{progress.position[cell.name]}/{progress.total}] done already: {cell.output_dir}", flush=True)
        else:
            waiting.append(cell)
    running: dict[int, tuple[Cell, object, object, float]] = {}  # slot -> (cell, process, thread, start)
    try:
        while waiting or running:
            for slot in range(parallel):
                cell = next_cell(waiting, [cell for cell, *_ in running.values()]) if slot not in running else None
                if cell is not None:
                    waiting.remove(cell)
                    process, thread = start(cell, nproc, env={**os.environ, **slots[slot]}, echo=parallel == 1,
                                            cwd=cwd)
                    running[slot] = (cell, process, thread, time.monotonic())
                    print(progress.line(cell, f"start {cell.name}, log {cell.log}", len(waiting), len(running)),
                          flush=True)
            time.sleep(0.2)
            for slot, (cell, process, thread, started) in list(running.items()):
                if process.poll() is None:
                    continue
                thread.join()
                del running[slot]
                took = time.monotonic() - started
                progress.durations.append(took)
                if process.returncode == 0 and cell.finished():
                    outcome.finished.append(cell)
                    event = f"finished {cell.name} in {clock(took)}"
                else:
                    outcome.failed.append((cell, process.returncode))
                    event = f"FAILED {cell.name} (exit {process.returncode}) after {clock(took)}, log {cell.log}"
                print(progress.line(cell, event, len(waiting), len(running)), flush=True)
    except BaseException:  # Ctrl-C or an error here: no cell keeps running unattended
        for _, process, _, _ in running.values():
            process.terminate()
        for _, process, _, _ in running.values():
            process.wait()
        raise
    return outcome


def summary(outcome: SweepOutcome) -> str:
    """Every cell by outcome, with its log; failed cells last, so they are what stays on screen."""
    lines = [f"sweep: {len(outcome.finished)} finished, {len(outcome.skipped)} skipped (done already), "
             f"{len(outcome.failed)} failed"]
    lines += [f"  finished {cell.name}: {cell.log}" for cell in outcome.finished]
    lines += [f"  skipped  {cell.name}: {cell.output_dir}" for cell in outcome.skipped]
    lines += [f"  FAILED   {cell.name} (exit {code}): {cell.log}" for cell, code in outcome.failed]
    return "\n".join(lines)
