"""Table sweeps at scale: parallel cells, failures, skips, resume after a kill, submitit's array jobs."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import processes
from tiny_assets import glue_rows, write_jsonl, write_tiny_roberta

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


def write_table(root: Path, model_dir: Path, tasks=("rte", "sst2"), epochs=2, train_rows=16, broken=False) -> Path:
    """A user's own table, outside configs/: LoRPA configs at the top, LoRA r=4 in lora_r4/."""
    (root / "lora_r4").mkdir(parents=True)
    for task in tasks:
        train = write_jsonl(root / f"{task}-train.jsonl", glue_rows(task, train_rows, 0))
        validation = write_jsonl(root / f"{task}-validation.jsonl", glue_rows(task, 8, 1))
        common = (f"model_name_or_path: {model_dir}\ntask_name: {task}\ntrain_file: {train}\n"
                  f"validation_file: {validation}\nnum_train_epochs: {epochs}\nper_device_train_batch_size: 4\n"
                  "disable_tqdm: true\n")
        (root / f"{task}.yaml").write_text(common + "method: lorpa\nlora_r: 8\nprune_target_rank: 2\n")
        lora_r = 0 if broken else 4  # rank 0: the run stops with a usage error
        (root / "lora_r4" / f"{task}.yaml").write_text(common + f"method: lora\nlora_r: {lora_r}\n")
    return root


def train_sh(*args, env_extra=None):
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env_extra or {}))
    return processes.run(["bash", ROOT / "train.sh", *args], timeout=420, env=environment)


def run_interval(log: Path) -> tuple[float, float]:
    """(start, exit) wall-clock seconds of the last attempt in a cell's train.log."""
    text = log.read_text()
    starts = re.findall(r"^=== start .*?\(([\d.]+)\)", text, re.M)
    exits = re.findall(r"^=== exit -?\d+ .*?\(([\d.]+)\)", text, re.M)
    return float(starts[-1]), float(exits[-1])


def test_parallel_cells_overlap_a_broken_cell_fails_alone_and_a_rerun_skips_finished(model_dir, tmp_path):
    table = write_table(tmp_path / "my-table", model_dir, broken=True)
    (table / "lora_r4/sst2.yaml").unlink()
    runs = tmp_path / "runs"
    done = train_sh("--table", table, "--parallel", "2", "--seeds", "1", "--runs_dir", runs)
    assert done.returncode == 1, done.stderr[-3000:]
    out = done.stdout
    # cells in order: lorpa/rte, lorpa/sst2, then the broken lora_r4/rte, which waits for a free slot
    assert re.search(r"^\[1/3\] start lorpa/rte/seed1, log .*train.log "
                     r"\(elapsed 0:00:0\d, time left unknown\)$", out, re.M)
    assert re.search(r"^\[3/3\] start lora_r4/rte/seed1, .*\(elapsed \d:\d\d:\d\d, ~\d:\d\d:\d\d left\)$", out, re.M)
    assert re.search(r"^\[3/3\] FAILED lora_r4/rte/seed1 \(exit 2\) after", out, re.M)
    assert "sweep: 2 finished, 0 skipped (done already), 1 failed" in out
    broken_log = runs / "lora_r4/rte/seed1/train.log"
    assert f"  FAILED   lora_r4/rte/seed1 (exit 2): {broken_log}" in out
    assert "error: --lora_r must be a positive integer, got 0" in broken_log.read_text()
    (rte_start, rte_end), (sst2_start, sst2_end) = (run_interval(runs / f"lorpa/{task}/seed1/train.log")
                                                    for task in ("rte", "sst2"))
    assert rte_start < sst2_end and sst2_start < rte_end  # the two cells ran at the same time
    assert "RTE" in (runs / "summary.md").read_text() and "SST-2" in (runs / "summary.md").read_text()
    assert json.loads((runs / "sweep.json").read_text())["cells"][2]["output_dir"] == "lora_r4/rte/seed1"

    (table / "lora_r4/rte.yaml").write_text((table / "lora_r4/rte.yaml").read_text().replace("lora_r: 0", "lora_r: 4"))
    again = train_sh("--table", table, "--parallel", "2", "--seeds", "1", "--runs_dir", runs)
    assert again.returncode == 0, again.stdout[-3000:]
    assert re.findall(r"^\[(\d)/3\] done already: ", again.stdout, re.M) == ["1", "2"]
    assert "sweep: 1 finished, 2 skipped (done already), 0 failed" in again.stdout
    assert (runs / "lora_r4/rte/seed1/results.json").is_file()


def training_process(output_dir: Path) -> int | None:
    """The pid of the run_glue.py process writing to `output_dir` (read from /proc)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            command = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(output_dir).encode() in command and any(part.endswith(b"run_glue.py") for part in command):
            return int(entry.name)
    return None


def wait_for_checkpoint(output_dir: Path, timeout: float = 240) -> Path:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = list(output_dir.glob("train/checkpoint-*/trainer_state.json"))
        if found:
            return found[0].parent
        time.sleep(0.02)
    raise AssertionError(f"no checkpoint below {output_dir}")


def parent_of(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"^PPid:\s+(\d+)", status, re.M).group(1))


def test_submitit_array_runs_the_table_a_preempted_cell_resumes_and_resubmission_skips(model_dir, tmp_path):
    """`--launcher submitit-local` runs the array job the slurm launcher submits, on submitit's local
    executor. One cell is preempted (SIGUSR2 to its array task, as SLURM sends) after its first
    checkpoint: it is requeued and resumes from that checkpoint. A second submission runs nothing."""
    pytest.importorskip("submitit")
    table = write_table(tmp_path / "table", model_dir, tasks=("rte", "sst2"), epochs=8, train_rows=64)
    runs = tmp_path / "runs"
    argv = ["--table", table, "--methods", "lora", "--seeds", "1", "--launcher", "submitit-local", "--runs_dir", runs,
            "--slurm_sbatch", "account=lorpa", "--per_device_train_batch_size=4"]
    sweep = processes.start(["bash", ROOT / "train.sh", *argv], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    preempted = runs / "lora_r4/rte/seed1"
    try:
        checkpoint = wait_for_checkpoint(preempted)
        trainer = training_process(preempted)
        assert trainer is not None
        os.kill(parent_of(trainer), signal.SIGUSR2)  # the array task running the cell
        out = sweep.communicate(timeout=420)[0]
    finally:
        processes.kill_tree(sweep)
    assert sweep.returncode == 0, out[-3000:]
    assert re.search(r"^submitted 2 cells as array job \d+", out, re.M)
    assert "RTE" in (runs / "summary.md").read_text() and "SST-2" in (runs / "summary.md").read_text()
    assert list((runs / "slurm").glob("*/*_submitted.pkl"))  # submitit's own files stay below the sweep

    log = (preempted / "train.log").read_text()
    starts = [line for line in log.splitlines() if line.startswith("=== start")]
    assert len(starts) == 2 and "--resume_from_checkpoint latest" in starts[1]
    assert "--resume_from_checkpoint" not in starts[0]
    results = json.loads((preempted / "results.json").read_text())
    history = results["stages"][0]["history"]
    assert [entry["epoch"] for entry in history] == [float(e) for e in range(1, 9)]
    assert history[-1]["step"] == 8 * 16 and int(checkpoint.name.split("-")[1]) < 8 * 16  # 64 rows at batch 4
    assert (runs / "lora_r4/sst2/seed1/results.json").is_file()

    again = train_sh(*argv)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done already: ") == 2 and "every cell is finished" in again.stdout


def test_cell_killed_after_its_first_checkpoint_resumes_from_it(model_dir, tmp_path):
    table = write_table(tmp_path / "table", model_dir, tasks=("rte",), epochs=8, train_rows=64)
    runs = tmp_path / "runs"
    command = ["bash", str(ROOT / "train.sh"), "--table", str(table), "--methods", "lora", "--seeds", "1",
               "--runs_dir", str(runs)]
    sweep = processes.start(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=dict(os.environ, OMP_NUM_THREADS="1"))
    output_dir = runs / "lora_r4/rte/seed1"
    try:
        checkpoint = wait_for_checkpoint(output_dir)
    finally:
        processes.kill_tree(sweep)  # the launcher and its training process, as a node failure would
    assert not (output_dir / "results.json").exists()
    done = train_sh(*command[2:])
    assert done.returncode == 0, done.stdout[-3000:]
    starts = [line for line in (output_dir / "train.log").read_text().splitlines() if line.startswith("=== start")]
    assert len(starts) == 2 and "--resume_from_checkpoint latest" in starts[1]
    history = json.loads((output_dir / "results.json").read_text())["stages"][0]["history"]
    assert [entry["epoch"] for entry in history] == [float(e) for e in range(1, 9)]
    assert int(checkpoint.name.split("-")[1]) < 8 * 16


def test_slurm_launcher_writes_one_array_job_with_the_options(tmp_path):
    """Stand-ins for sbatch and srun on PATH: the sbatch file submitit writes is what SLURM would get."""
    pytest.importorskip("submitit")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\ncp "${@: -1}" "$SBATCH_COPY"\n'
                                    'echo "Submitted batch job 4242"\n')
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    runs, copy = tmp_path / "runs", tmp_path / "job.sh"
    finished = runs / "lorpa/rte/seed1"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    done = train_sh("--table", "glue-base", "--seeds", "1,2", "--launcher", "slurm", "--slurm_partition", "gpu",
                    "--slurm_time", "8:00:00", "--slurm_cpus_per_task", "8", "--slurm_array_parallelism", "16",
                    "--slurm_sbatch", "account=myproject", "--runs_dir", runs, "--max_train_samples", "64",
                    env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_COPY": str(copy)})
    assert done.returncode == 0, done.stderr[-3000:]
    # glue-base: 8 tasks x (LoRPA + LoRA r=8, 128, 256) x 2 seeds = 64 cells, one finished already
    assert f"done already: {finished}" in done.stdout
    assert "submitted 63 cells as array job 4242" in done.stdout
    lines = copy.read_text().splitlines()
    for expected in ("#SBATCH --array=0-62%16", "#SBATCH --partition=gpu", "#SBATCH --time=480",
                     "#SBATCH --cpus-per-task=8", "#SBATCH --gpus-per-task=1", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --account=myproject", "#SBATCH --signal=USR2@90"):
        assert expected in lines
    manifest = json.loads((runs / "sweep.json").read_text())["cells"]
    assert len(manifest) == 64 and manifest[1]["flags"] == ["--max_train_samples", "64", "--seed", "1"]


def test_slurm_runs_a_cell_that_reuses_its_twin_as_a_job_after_the_twin_s_task(tmp_path):
    pytest.importorskip("submitit")
    bin_dir, sbatch_files = tmp_path / "bin", tmp_path / "sbatch"
    bin_dir.mkdir()
    sbatch_files.mkdir()
    (bin_dir / "sbatch").write_text('#!/usr/bin/env bash\nn=$(ls "$SBATCH_DIR" | wc -l)\n'
                                    'cp "${@: -1}" "$SBATCH_DIR/$n.sh"\necho "Submitted batch job $((4242 + n))"\n')
    (bin_dir / "srun").write_text("#!/usr/bin/env bash\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    done = train_sh("--table", "minilm-study", "--methods", "lora_r64,svd_s100,magnitude", "--seeds", "1",
                    "--launcher", "slurm", "--slurm_sbatch", "account=myproject", "--runs_dir", tmp_path / "runs",
                    env_extra={"PATH": f"{bin_dir}:{os.environ['PATH']}", "SBATCH_DIR": str(sbatch_files)})
    assert done.returncode == 0, done.stderr[-3000:]
    assert ("submitted 4 cells as array job 4242 and 2 as jobs that start when their LoRA twin's task ends"
            in done.stdout)
    array, *after_twin = [(sbatch_files / f"{n}.sh").read_text().splitlines() for n in range(3)]
    assert "#SBATCH --array=0-3%4" in array and not any("--dependency" in line for line in array)
    for lines, twin_task in zip(after_twin, ("4242_0", "4242_1")):  # the array's tasks 0, 1: lora_r64 sst2, stsb
        assert f"#SBATCH --dependency=afterany:{twin_task}" in lines and "#SBATCH --account=myproject" in lines
        assert not any(line.startswith("#SBATCH --array") for line in lines)


def test_slurm_launcher_off_a_cluster_is_one_line(tmp_path):
    pytest.importorskip("submitit")
    done = train_sh("--table", "glue-base", "--seeds", "1", "--launcher", "slurm", "--runs_dir", tmp_path,
                    env_extra={"PATH": os.path.dirname(sys.executable) + ":/usr/bin:/bin"})
    assert done.returncode == 2
    assert done.stderr == ('error: --launcher slurm: Could not detect "srun", are you indeed on a slurm cluster? '
                           "(submit from a login node of the cluster)\n")


def test_slurm_launcher_without_submitit_names_the_extra(monkeypatch, capsys, tmp_path):
    from lorpa.cli import run_cli
    from lorpa.harness import launch

    monkeypatch.setitem(sys.modules, "submitit", None)  # as if not installed
    argv = ["--table", "glue-base", "--seeds", "1", "--launcher", "slurm", "--runs_dir", str(tmp_path / "runs")]
    assert run_cli(launch.main, argv) == 2
    assert not (tmp_path / "runs").exists()
    assert capsys.readouterr().err == (
        "error: --launcher slurm needs submitit: pip install 'lorpa[slurm]' (or pip install submitit)\n")


@pytest.mark.parametrize(("time", "expected"), [
    ("90", 90), ("30:30", 31), ("8:00:00", 480), ("1-00", 1440), ("1-02:30", 1590), ("0:0:30", 1),
])
def test_slurm_time_formats_become_minutes(time, expected):
    from lorpa.harness.sweep.slurm import minutes

    assert minutes(time) == expected


def test_bad_slurm_time_is_one_line_before_anything_is_written(capsys, tmp_path):
    pytest.importorskip("submitit")
    from lorpa.cli import run_cli
    from lorpa.harness import launch

    argv = ["--table", "glue-base", "--launcher", "slurm", "--slurm_time", "8h", "--runs_dir", str(tmp_path / "runs")]
    assert run_cli(launch.main, argv) == 2
    assert capsys.readouterr().err == "error: --slurm_time '8h': use MINUTES, HH:MM:SS or D-HH:MM:SS\n"
    assert not (tmp_path / "runs").exists()


def test_parallel_cells_get_their_own_gpus_or_share_of_the_cores(monkeypatch):
    from lorpa.errors import InputError
    from lorpa.harness.sweep.local import slot_environments

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5,6,7")
    assert slot_environments(2, 2, gpus=4) == [{"CUDA_VISIBLE_DEVICES": "3,5"}, {"CUDA_VISIBLE_DEVICES": "6,7"}]
    assert slot_environments(4, 1, gpus=4)[3] == {"CUDA_VISIBLE_DEVICES": "7"}
    with pytest.raises(InputError, match=r"--parallel 3 x --nproc 2 needs 6 GPUs, 4 visible"):
        slot_environments(3, 2, gpus=4)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    assert slot_environments(2, 1, gpus=2) == [{"CUDA_VISIBLE_DEVICES": "0"}, {"CUDA_VISIBLE_DEVICES": "1"}]
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert slot_environments(3, 1, gpus=0) == [{"OMP_NUM_THREADS": "5", "MKL_NUM_THREADS": "5"}] * 3
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's own per-process choice wins
    assert slot_environments(4, 1, gpus=0)[0] == {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}


def write_late_table(root: Path, model_dir: Path) -> Path:
    """LoRA r=8, and two LoRPA rows from r0=8: pruned after the whole budget (whose stage 1 is the LoRA
    run) and after 20% of it."""
    root.mkdir(parents=True)
    train = write_jsonl(root / "train.jsonl", glue_rows("sst2", 16, 0))
    validation = write_jsonl(root / "validation.jsonl", glue_rows("sst2", 8, 1))
    common = (f"model_name_or_path: {model_dir}\ntask_name: sst2\ntrain_file: {train}\nvalidation_file: {validation}\n"
              "num_train_epochs: 2\nper_device_train_batch_size: 4\ndisable_tqdm: true\nlora_r: 8\nlora_alpha: 16\n")
    for row, method in {"lora_r8": "method: lora\n",
                        "late": "method: lorpa\nstage1_ratio: 1.0\nprune_target_rank: 2\nprune_score: svd\n",
                        "early": "method: lorpa\nprune_target_rank: 2\nprune_score: svd\n"}.items():
        (root / row).mkdir(parents=True)
        (root / row / "sst2.yaml").write_text(common + method)
    return root


def test_a_prune_at_the_end_cell_reuses_its_lora_twin_and_matches_training_stage1_itself(model_dir, tmp_path):
    from safetensors.torch import load_file

    table = write_late_table(tmp_path / "late-table", model_dir)
    runs = tmp_path / "runs"
    done = train_sh("--table", table, "--parallel", "2", "--seeds", "1", "--runs_dir", runs)
    assert done.returncode == 0, done.stdout[-3000:]
    # table order is early, late, lora_r8; late waits for its twin, so early and lora_r8 start first
    starts = re.findall(r"^\[\d/3\] start (\w+)/", done.stdout, re.M)
    assert starts == ["early", "lora_r8", "late"]
    twin = runs / "lora_r8/sst2/seed1"
    assert f"--stage1_adapter {twin}" in (runs / "late/sst2/seed1/train.log").read_text()
    assert "--stage1_adapter" not in (runs / "early/sst2/seed1/train.log").read_text()
    manifest = {cell["name"]: cell["stage1_from"] for cell in json.loads((runs / "sweep.json").read_text())["cells"]}
    assert manifest == {"early/sst2/seed1": None, "late/sst2/seed1": "lora_r8/sst2/seed1", "lora_r8/sst2/seed1": None}

    alone = tmp_path / "alone"  # the same cell, stage 1 trained here
    solo = train_sh(table / "late/sst2.yaml", "--seed", "1", "--output_dir", alone)
    assert solo.returncode == 0, solo.stderr[-3000:]
    reused, trained = (json.loads(Path(folder, "results.json").read_text())
                       for folder in (runs / "late/sst2/seed1", alone))
    assert reused["metrics"] == trained["metrics"]
    assert [{k: prune[k] for k in ("before", "after", "mean_relative_error")} for prune in reused["prunes"]] == \
        [{k: prune[k] for k in ("before", "after", "mean_relative_error")} for prune in trained["prunes"]]
    weights = [load_file(str(Path(folder, "adapter_model.safetensors")))
               for folder in (runs / "late/sst2/seed1", alone)]
    assert weights[0].keys() == weights[1].keys()
    assert all(torch.equal(weights[0][name], weights[1][name]) for name in weights[0])


def test_submitit_local_runs_the_reusing_cell_after_its_twin(model_dir, tmp_path):
    pytest.importorskip("submitit")
    table = write_late_table(tmp_path / "late-table", model_dir)
    runs = tmp_path / "runs"
    done = train_sh("--table", table, "--methods", "late,lora_r8", "--seeds", "1", "--launcher", "submitit-local",
                    "--runs_dir", runs)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    twin = runs / "lora_r8/sst2/seed1"
    assert f"--stage1_adapter {twin}" in (runs / "late/sst2/seed1/train.log").read_text()
    assert run_interval(twin / "train.log")[1] <= run_interval(runs / "late/sst2/seed1/train.log")[0]


def test_only_cells_whose_stage1_is_a_lora_run_of_the_sweep_are_linked(tmp_path):
    from lorpa.harness import launch

    cells = launch.sweep_cells("minilm-study", [1, 2], ["all"], tmp_path, [])
    linked = {cell.name: cell.stage1_from.relative_to(tmp_path).as_posix() for cell in cells if cell.stage1_from}
    late_rows = [p.name for p in launch.TABLES["minilm-study"].iterdir() if "_s100" in p.name]  # cut at 100%, by name
    assert {"magnitude_s100", "svd_s100", "act_s100_r2_rec", "act_s100_global_rel_r1"} <= set(late_rows)
    twin = {"svd_s100_tolerance": "lora_r64_selection"}  # it holds out a selection split, as its twin does
    assert linked == {f"{row}/{task}/seed{seed}": f"{twin.get(row, 'lora_r64')}/{task}/seed{seed}"
                      for row in late_rows for task in ("sst2", "stsb") for seed in (1, 2)}
    only_late = launch.sweep_cells("minilm-study", [1], ["svd_s100"], tmp_path, [])  # its twin ran in another sweep
    assert [cell.stage1_from.relative_to(tmp_path).as_posix() for cell in only_late] == ["lora_r64/sst2/seed1",
                                                                                        "lora_r64/stsb/seed1"]
    # a flag that changes the prune for every cell, or a config that differs beyond the prune, links nothing
    assert not any(cell.stage1_from for cell in launch.sweep_cells("minilm-study", [1], ["all"], tmp_path,
                                                                   ["--stage1_ratio=0.5"]))
    table = tmp_path / "table"
    for row in ("lora_r64", "svd_s100"):
        (table / row).mkdir(parents=True)
        (table / row / "sst2.yaml").write_text((launch.TABLES["minilm-study"] / row / "sst2.yaml").read_text())
    late = table / "svd_s100/sst2.yaml"
    assert [c.name for c in launch.sweep_cells(str(table), [1], ["all"], tmp_path, [])
            if c.stage1_from] == ["svd_s100/sst2/seed1"]
    late.write_text(late.read_text().replace("learning_rate: 1.0e-3", "learning_rate: 2.0e-3"))
    assert not any(c.stage1_from for c in launch.sweep_cells(str(table), [1], ["all"], tmp_path, []))


def test_every_method_flag_is_known_to_decide_stage_1_or_only_what_follows_it():
    """A new flag must be sorted here, or a sweep could reuse a LoRA twin whose stage 1 it would have changed."""
    import dataclasses

    from lorpa.harness.arguments import MethodArguments
    from lorpa.harness.sweep.reuse import AFTER_STAGE1_KEYS

    stage1 = {"overwrite_output_dir", "lora_r", "lora_alpha", "lora_dropout", "lora_target_modules", "modules_to_save",
              "adalora_target_r", "adalora_tinit_ratio", "adalora_tfinal_ratio"}
    fields = {field.name for field in dataclasses.fields(MethodArguments)}
    assert fields == stage1 | AFTER_STAGE1_KEYS and not stage1 & AFTER_STAGE1_KEYS
