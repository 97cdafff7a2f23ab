"""Resuming after a kill at any moment: incomplete checkpoints, a damaged pruning step, atomic JSON files."""

import json
import os
import shutil
import stat

import pytest

import run_glue
from lorpa.checkpoints import find_resume_point, write_json_atomic
from lorpa.errors import InputError
from lorpa.stages import PRUNED_ADAPTER_DIR, Stage
from test_run_glue import argv_for, read_results, task_files

from tiny_assets import write_tiny_roberta

STAGES = [Stage("stage1", 1), Stage("stage2", 4)]


def complete_checkpoint(folder):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    shutil.make_archive(str(folder / "optimizer"), "zip", root_dir=folder, base_dir="adapter_model.safetensors")
    (folder / "optimizer.zip").rename(folder / "optimizer.pt")
    (folder / "trainer_state.json").write_text('{"global_step": 1}')
    return folder


def test_latest_skips_checkpoints_cut_off_while_saving(tmp_path, capsys):
    good = complete_checkpoint(tmp_path / "stage2" / "checkpoint-8")
    (tmp_path / "stage2" / "checkpoint-12").mkdir()  # killed before anything was written
    cut = complete_checkpoint(tmp_path / "stage2" / "checkpoint-10")
    (cut / "trainer_state.json").write_text('{"global_st')  # killed while writing the state
    assert find_resume_point("latest", str(tmp_path), STAGES) == (1, str(good))
    skipped = capsys.readouterr().err
    assert "skipping incomplete checkpoint" in skipped and "checkpoint-12" in skipped and "checkpoint-10" in skipped


def test_latest_falls_back_to_the_previous_stage_then_to_the_start(tmp_path, capsys):
    stage1 = complete_checkpoint(tmp_path / "stage1" / "checkpoint-4")
    broken = complete_checkpoint(tmp_path / "stage2" / "checkpoint-8")
    (broken / "optimizer.pt").write_bytes(b"PK\x03\x04 truncated")
    assert find_resume_point("latest", str(tmp_path), STAGES) == (0, str(stage1))
    assert "optimizer.pt is damaged" in capsys.readouterr().err
    shutil.rmtree(stage1)
    (tmp_path / "stage1" / "checkpoint-4").mkdir()
    assert find_resume_point("latest", str(tmp_path), STAGES) == (0, None)
    assert "starts from the beginning" in capsys.readouterr().err


def test_checkpoints_in_the_layouts_fsdp_saves_resume_and_a_cut_off_one_is_skipped(tmp_path, capsys):
    """accelerate's names for an FSDP run: a full state dict in one file, a sharded one in a distributed-checkpoint
    folder."""
    full = complete_checkpoint(tmp_path / "stage1" / "checkpoint-2")
    (full / "adapter_model.safetensors").unlink()
    (full / "optimizer.pt").rename(full / "pytorch_model_fsdp.bin")
    shutil.copy(full / "pytorch_model_fsdp.bin", full / "optimizer.bin")
    assert find_resume_point(str(full), str(tmp_path), STAGES) == (0, str(full))
    sharded = complete_checkpoint(tmp_path / "stage1" / "checkpoint-4")
    (sharded / "adapter_model.safetensors").unlink()
    (sharded / "optimizer.pt").unlink()
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        (sharded / folder).mkdir()
        (sharded / folder / ".metadata").write_bytes(b"dcp")
    assert find_resume_point("latest", str(tmp_path), STAGES) == (0, str(sharded))
    (sharded / "optimizer_0" / ".metadata").unlink()
    (sharded / "optimizer_0").rmdir()  # killed before the optimizer was saved
    assert find_resume_point("latest", str(tmp_path), STAGES) == (0, str(full))
    assert "no optimizer state" in capsys.readouterr().err
    (full / "optimizer.bin").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(InputError, match="optimizer.bin is damaged"):
        find_resume_point(str(full), str(tmp_path), STAGES)


def test_a_named_incomplete_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / "stage1" / "checkpoint-4").mkdir(parents=True)
    with pytest.raises(InputError, match="cannot be resumed: no readable trainer_state.json"):
        find_resume_point(str(tmp_path / "stage1" / "checkpoint-4"), str(tmp_path), STAGES)


def test_json_files_get_the_folders_normal_permissions_and_replace_atomically(tmp_path):
    old_umask = os.umask(0o022)
    try:
        write_json_atomic(tmp_path / "results.json", {"a": 1})
        write_json_atomic(tmp_path / "results.json", {"a": 2})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "results.json").stat().st_mode) == 0o644
    assert json.loads((tmp_path / "results.json").read_text()) == {"a": 2}
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


@pytest.fixture(scope="module")
def finished_lorpa_run(tmp_path_factory):
    """A LoRPA run with a checkpoint every epoch in both stages, its results.json removed afterwards."""
    folder = tmp_path_factory.mktemp("resume")
    model_dir = write_tiny_roberta(folder / "model")
    argv = argv_for(model_dir, folder, "rte", folder / "out", "--save_strategy", "epoch", "--save_total_limit", "3",
                    "--num_train_epochs", "3", "--stage1_ratio", "0.34", files=task_files(folder, "rte"))
    run_glue.main(argv)
    complete = read_results(folder / "out")
    return folder / "out", argv, complete


def test_latest_resumes_past_a_checkpoint_killed_while_saving(finished_lorpa_run, tmp_path, capsys):
    source, argv, complete = finished_lorpa_run
    output_dir = tmp_path / "out"
    shutil.copytree(source, output_dir)
    (output_dir / "results.json").unlink()
    last = max((output_dir / "stage2").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    killed = output_dir / "stage2" / "checkpoint-999"
    shutil.copytree(last, killed)
    (killed / "trainer_state.json").unlink()
    argv = [output_dir.as_posix() if a == source.as_posix() else a for a in argv]
    run_glue.main(argv + ["--resume_from_checkpoint", "latest"])
    assert f"skipping incomplete checkpoint {killed}" in capsys.readouterr().err
    assert read_results(output_dir)["metrics"]["accuracy"] == pytest.approx(complete["metrics"]["accuracy"])


@pytest.mark.parametrize("damage", ["missing adapter", "damaged adapter", "damaged report"])
def test_a_damaged_pruning_step_says_what_to_resume_from(finished_lorpa_run, tmp_path, capsys, damage):
    source, argv, _ = finished_lorpa_run
    output_dir = tmp_path / "out"
    shutil.copytree(source, output_dir)
    adapter = output_dir / PRUNED_ADAPTER_DIR
    if damage == "missing adapter":
        shutil.rmtree(adapter)
    elif damage == "damaged adapter":
        (adapter / "adapter_model.safetensors").write_bytes(b"\x00" * 16)
    else:
        (output_dir / "prune_report.json").write_text('{"modules": ')
    stage2 = sorted((output_dir / "stage2").glob("checkpoint-*"))[0]
    stage1 = max((output_dir / "stage1").glob("checkpoint-*"), key=lambda p: int(p.name.split("-")[1]))
    argv = [output_dir.as_posix() if a == source.as_posix() else a for a in argv]
    before = (output_dir / "results.json").read_text()
    assert run_glue.run_cli(run_glue.main, argv + ["--resume_from_checkpoint", str(stage2)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error")]
    assert len(errors) == 1
    assert f"--resume_from_checkpoint {stage1}" in errors[0] and "redone deterministically" in errors[0]
    assert (output_dir / "results.json").read_text() == before

    # following the advice finishes the run
    (output_dir / "results.json").unlink()
    run_glue.main(argv + ["--resume_from_checkpoint", str(stage1)])
    assert read_results(output_dir)["ranks"]
