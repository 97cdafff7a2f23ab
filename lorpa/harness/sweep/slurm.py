"""A sweep as one SLURM array job, through `submitit` (install the `slurm` extra), and a job for each
cell that waits for its LoRA twin's task (`reuse.py`).

Each array task runs one cell. On preemption or near its time limit SLURM signals the task;
submitit then calls `CellJob.checkpoint`, which stops the training process and requeues the same
cell, and the requeued task resumes from the cell's latest checkpoint. Cells that finished are
not submitted again, so a second submission only runs what is left.
"""

from __future__ import annotations

import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from ...errors import InputError
from ..commands import ROOT, visible_gpus
from .cells import Cell, start

SUBMITIT_FOLDER = "slurm"  # below the sweep folder: sbatch files, submitit's pickles and task logs


def import_submitit():
    try:
        import submitit
    except ImportError:
        raise InputError("--launcher slurm needs submitit: pip install 'lorpa[slurm]' "
                         "(or pip install submitit)") from None
    return submitit


@dataclass
class SlurmOptions:
    partition: str | None = None
    gpus_per_task: int = 1
    cpus_per_task: int | None = None
    time: str = "24:00:00"
    array_parallelism: int = 64
    sbatch: tuple[str, ...] = ()  # extra `#SBATCH --key=value` lines, given as key=value


def minutes(time: str) -> int:
    """SLURM's --time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) in whole minutes, rounded up."""
    match = re.fullmatch(r"(?:(\d+)-)?(\d+(?::\d+){0,2})", time.strip())
    if not match:
        raise InputError(f"--slurm_time {time!r}: use MINUTES, HH:MM:SS or D-HH:MM:SS")
    days, parts = match.group(1), [int(part) for part in match.group(2).split(":")]
    if days is not None:
        hours, mins, secs = (parts + [0, 0])[:3]
        seconds = ((int(days) * 24 + hours) * 60 + mins) * 60 + secs
    elif len(parts) == 3:
        seconds = (parts[0] * 60 + parts[1]) * 60 + parts[2]
    else:
        seconds = parts[0] * 60 + (parts[1] if len(parts) == 2 else 0)
    return max(1, -(-seconds // 60))


def sbatch_parameters(lines: tuple[str, ...]) -> dict[str, str | bool]:
    """`key=value` (or a bare `key` for a switch) per extra #SBATCH line."""
    parameters = {}
    for line in lines:
        key, separator, value = line.removeprefix("--").partition("=")
        if not key:
            raise InputError(f"--slurm_sbatch {line!r}: expected KEY=VALUE, e.g. account=myproject")
        parameters[key.replace("-", "_")] = value if separator else True
    return parameters


def executor_for(folder: Path, options: SlurmOptions, name: str, cluster: str):
    """submitit's executor for the array; `cluster="local"` runs the same jobs on this machine."""
    submitit = import_submitit()
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster)
    except RuntimeError as error:  # e.g. no srun: not on a SLURM cluster
        raise InputError(f"--launcher slurm: {error} (submit from a login node of the cluster)") from None
    executor.update_parameters(
        name=name,
        nodes=1,
        tasks_per_node=1,  # one process per cell; a cell with several GPUs runs torchrun itself
        timeout_min=minutes(options.time),
        stderr_to_stdout=True,
        slurm_partition=options.partition,
        slurm_gpus_per_task=options.gpus_per_task or None,
        slurm_cpus_per_task=options.cpus_per_task,
        slurm_array_parallelism=options.array_parallelism,
        slurm_additional_parameters=sbatch_parameters(options.sbatch) or None,
    )
    return executor


class CellJob:
    """What one array task runs: the cell, from its latest checkpoint if it has one."""

    def __init__(self, cell: Cell, nproc: int | None = None):
        self.cell, self.nproc = cell, nproc
        self._process = None

    def __call__(self) -> str:
        if self.cell.finished():
            return f"done already: {self.cell.output_dir}"
        nproc = self.nproc or max(1, visible_gpus())
        self._process, thread = start(self.cell, nproc, echo=True, cwd=ROOT)  # configs' paths are relative to it
        while self._process.poll() is None:  # not wait(): `checkpoint` waits for the process from a signal handler
            time.sleep(0.5)
        thread.join()
        if self._process.returncode != 0 or not self.cell.finished():
            raise RuntimeError(f"cell {self.cell.name} failed (exit {self._process.returncode}); log {self.cell.log}")
        return f"finished: {self.cell.output_dir}"

    def checkpoint(self):
        """Preempted or timed out: stop training (its last checkpoint is on disk) and requeue this cell."""
        from submitit.helpers import DelayedSubmission

        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            self._process.wait()
        return DelayedSubmission(CellJob(self.cell, self.nproc))

    def __getstate__(self):
        return {"cell": self.cell, "nproc": self.nproc, "_process": None}


def waiting_for_twin(todo: list[Cell]) -> list[Cell]:
    """The cells whose LoRA twin is among `todo`: they start after it."""
    pending = {cell.output_dir for cell in todo}
    return [cell for cell in todo if cell.stage1_from in pending]


def submit(cells: list[Cell], runs_dir: Path, options: SlurmOptions, *, nproc: int | None, cluster: str = "slurm"):
    """One array job for the unfinished cells; returns (jobs, their cells) — none if all are finished.

    A cell that reuses its LoRA twin's run as stage 1 (sweep/reuse.py), with the twin in the array, is a
    job of its own that SLURM starts once the twin's task has ended (`afterany`: if the twin failed,
    the cell trains stage 1 itself). submitit's local executor has no dependencies: it waits here.
    """
    todo = [cell for cell in cells if not cell.finished()]
    for cell in cells:
        if cell.finished():
            print(f"done already: {cell.output_dir}")
    if not todo:
        return [], []
    executor = executor_for(runs_dir / SUBMITIT_FOLDER, options, f"lorpa-{runs_dir.name}", cluster)
    after_twin = waiting_for_twin(todo)
    first = [cell for cell in todo if cell not in after_twin]
    with executor.batch():
        jobs = [executor.submit(CellJob(cell, nproc)) for cell in first]
    job_of = {cell.output_dir: job for cell, job in zip(first, jobs)}
    for cell in after_twin:
        twin = job_of[cell.stage1_from]
        if cluster == "local":
            twin.wait()
        executor.update_parameters(slurm_additional_parameters={**sbatch_parameters(options.sbatch),
                                                                "dependency": f"afterany:{twin.job_id}"})
        jobs.append(executor.submit(CellJob(cell, nproc)))
    return jobs, first + after_twin


def wait(jobs, cells: list[Cell]) -> list[tuple[Cell, str]]:
    """Wait for every job; (cell, error) for each that failed."""
    failed = []
    for job, cell in zip(jobs, cells):
        try:
            job.result()
        except Exception as error:  # submitit re-raises the task's failure with its traceback
            failed.append((cell, str(error).strip().splitlines()[-1] if str(error).strip() else type(error).__name__))
    sys.stdout.flush()
    return failed
