"""train.sh: the offline demo path, table sweeps that skip and resume, and 2-process CPU DDP."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorpa.cli import run_cli
from lorpa.harness import commands, launch

import processes
from tiny_assets import glue_rows, write_jsonl, write_tiny_roberta

ROOT = Path(__file__).resolve().parents[1]
SMALL = "--max_train_samples 32 --max_eval_samples 16 --max_seq_length 32 --num_train_epochs 2 --disable_tqdm true"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return write_tiny_roberta(tmp_path_factory.mktemp("tiny-roberta"))


def train_sh(*args, env=None):
    environment = dict(os.environ, OMP_NUM_THREADS="1", **(env or {}))
    return processes.run(["bash", ROOT / "train.sh", *args], timeout=420, env=environment)


def test_default_demo_runs_both_methods_and_prints_the_table(model_dir, tmp_path):
    flags = SMALL + " --lora_r 8 --lora_alpha 16 --prune_target_rank 2"
    done = train_sh("--runs_dir", str(tmp_path), env={"LORPA_DEMO_MODEL": str(model_dir), "LORPA_DEMO_FLAGS": flags})
    assert done.returncode == 0, done.stderr[-2000:]
    lorpa_run = json.loads((tmp_path / "lorpa/results.json").read_text())
    lora_run = json.loads((tmp_path / "lora/results.json").read_text())
    assert set(lorpa_run["ranks"].values()) == {2} and set(lorpa_run["stage1_ranks"].values()) == {8}
    assert lora_run["method"] == "lora" and set(lora_run["ranks"].values()) == {8}
    assert lora_run["stages"][0]["epochs"] == sum(stage["epochs"] for stage in lorpa_run["stages"])
    assert "LoRPA" in done.stdout and "LoRA" in done.stdout  # the table went to the terminal
    assert (tmp_path / "summary.md").is_file()
    assert (tmp_path / "lorpa/rank_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    again = train_sh("--runs_dir", str(tmp_path), env={"LORPA_DEMO_MODEL": str(model_dir), "LORPA_DEMO_FLAGS": flags})
    assert again.returncode == 0 and again.stdout.count("] done already: ") == 2


@pytest.fixture
def table(tmp_path, monkeypatch, model_dir):
    """A two-task 'paper table' of tiny configs in the layout of configs/glue/roberta-base."""
    root = tmp_path / "configs"
    (root / "lora_r4").mkdir(parents=True)
    for task in ("rte", "sst2"):
        train = write_jsonl(tmp_path / f"{task}-train.jsonl", glue_rows(task, 16, 0))
        validation = write_jsonl(tmp_path / f"{task}-validation.jsonl", glue_rows(task, 8, 1))
        common = (f"model_name_or_path: {model_dir}\ntask_name: {task}\ntrain_file: {train}\n"
                  f"validation_file: {validation}\nnum_train_epochs: 2\nsave_strategy: epoch\ndisable_tqdm: true\n")
        (root / f"{task}.yaml").write_text(common + "method: lorpa\nlora_r: 8\nprune_target_rank: 2\n")
        (root / "lora_r4" / f"{task}.yaml").write_text(common + "method: lora\nlora_r: 4\n")
    monkeypatch.setitem(launch.TABLES, "glue-base", root)
    return root


@pytest.fixture
def fake_runs(monkeypatch):
    """Every run command replaced by one that writes an empty results.json; records (config, flags) and reports."""
    calls = {"runs": [], "reports": []}

    def command_for(config, flags, nproc, accelerate_config=None):
        calls["runs"].append((Path(config), flags))
        output_dir = flags[flags.index("--output_dir") + 1]
        return [sys.executable, "-c",
                f"import pathlib; pathlib.Path({output_dir!r}, 'results.json').write_text('{{}}')"]

    monkeypatch.setattr(commands, "command_for", command_for)
    monkeypatch.setattr(launch, "report", lambda runs_dir: calls["reports"].append(runs_dir))
    return calls


def test_table_sweep_skips_finished_cells_and_resumes_interrupted_ones(table, tmp_path, fake_runs):
    runs = tmp_path / "runs"
    finished = runs / "lora_r4/rte/seed1"
    finished.mkdir(parents=True)
    (finished / "results.json").write_text("{}")
    interrupted = runs / "lorpa/sst2/seed1/stage1/checkpoint-2"
    interrupted.mkdir(parents=True)

    launch.main(["--table", "glue-base", "--seeds", "1", "--runs_dir", str(runs)])

    runs_started = {flags[flags.index("--output_dir") + 1]: flags for _, flags in fake_runs["runs"]}
    assert set(runs_started) == {str(runs / p) for p in ("lorpa/rte/seed1", "lorpa/sst2/seed1", "lora_r4/sst2/seed1")}
    resumed = runs_started[str(runs / "lorpa/sst2/seed1")]
    assert resumed[resumed.index("--resume_from_checkpoint") + 1] == "latest"
    assert all(flags[flags.index("--seed") + 1] == "1" for flags in runs_started.values())
    assert fake_runs["reports"] == [runs]


@pytest.mark.parametrize("spelling", [["--max_train_samples", "64"], ["--max_train_samples=64"]])
def test_pass_through_flags_work_in_both_spellings_with_a_table(fake_runs, tmp_path, spelling):
    launch.main(["--table", "glue-minilm", "--seeds", "1", *spelling, "--runs_dir", str(tmp_path)])
    assert len(fake_runs["runs"]) == 4  # SST-2 and STS-B, LoRPA and LoRA r=8
    assert all(flags[:len(spelling)] == spelling for _, flags in fake_runs["runs"])


@pytest.mark.parametrize("spelling", [["--output_dir", "{}"], ["--output_dir={}"]])
def test_pass_through_flags_work_in_both_spellings_with_a_config(monkeypatch, tmp_path, spelling):
    commands = []
    monkeypatch.setattr(launch.subprocess, "run", lambda command, **kwargs: commands.append(command))
    spelling = [part.format(tmp_path / "mine") for part in spelling]
    launch.main([str(ROOT / "configs/demo.yaml"), *spelling, "--max_train_samples=64", "--model_name_or_path", "m"])
    (command,) = commands
    assert "--max_train_samples=64" in command
    output_dirs = [part for part in command if part.startswith("--output_dir")]
    assert output_dirs == spelling[:1]  # the user's folder, not a second --output_dir after it


def one_line_error(argv, capsys) -> str:
    assert run_cli(launch.main, argv) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: ")
    return errors[0]


def test_seeds_that_are_not_integers_give_one_line(capsys):
    error = one_line_error(["--table", "glue-minilm", "--seeds", "1,x"], capsys)
    assert error == "error: --seeds '1,x': expected comma-separated integers, e.g. --seeds 1,2,3"


def test_malformed_yaml_gives_one_line_with_line_and_column(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("task_name: sst2\nlora_r: 8\nlearning_rate: [1e-3\nseed: 1\n")
    error = one_line_error([str(bad)], capsys)
    problem = "line 4, column 5: expected ',' or ']', but got ':'"  # the `:` of `seed:` inside the open list
    assert error == f"error: config file {bad} is not valid YAML: {problem}"
    table = tmp_path / "table"
    table.mkdir()
    (table / "rte.yaml").write_text("task_name: rte\n")
    bad.rename(table / "sst2.yaml")
    error = one_line_error(["--table", str(table), "--seeds", "1"], capsys)
    assert error == f"error: config file {table / 'sst2.yaml'} is not valid YAML: {problem}"
    assert not (ROOT / "runs" / "table").exists()  # refused before any cell started


@pytest.mark.parametrize("flags", [["--lora_rr"], ["--lora_rr", "8"], ["--seed", "2"]])
def test_flags_without_a_config_are_refused_naming_the_flag(flags, capsys, monkeypatch):
    monkeypatch.setattr(launch, "demo", lambda *args: pytest.fail("the demo ran"))
    error = one_line_error(flags, capsys)
    assert error.startswith("error: the demo (train.sh without a config or --table) takes no run flags, "
                            f"got {flags[0]}")
    assert "config file not found" not in error


def test_a_config_after_flags_is_refused_with_the_order(capsys):
    error = one_line_error(["--seed", "2", "configs/glue/smoke.yaml"], capsys)
    assert error == "error: give the config first: bash train.sh configs/glue/smoke.yaml [flags]"


def test_table_sweep_end_to_end_then_resume_is_a_no_op(table, tmp_path):
    runs = tmp_path / "runs"
    launch.main(["--table", "glue-base", "--seeds", "1", "--runs_dir", str(runs), "--methods", "lorpa"])
    results = sorted(p.relative_to(runs).as_posix() for p in runs.rglob("results.json"))
    assert results == ["lorpa/rte/seed1/results.json", "lorpa/sst2/seed1/results.json"]
    summary = (runs / "summary.md").read_text()
    assert "RTE" in summary and "SST-2" in summary


def test_two_process_cpu_ddp_prunes_identically_and_writes_one_result(model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", glue_rows("sst2", 32, 0))
    validation = write_jsonl(tmp_path / "validation.jsonl", glue_rows("sst2", 8, 1))
    output_dir = tmp_path / "ddp"
    done = train_sh(
        "configs/glue/smoke.yaml", "--nproc", "2", "--model_name_or_path", str(model_dir),
        "--train_file", str(train), "--validation_file", str(validation), "--modules_to_save", "classifier",
        "--prune_scope", "global", "--prune_score", "svd",  # svd: every process takes rank 0's rewritten factors
        "--num_train_epochs", "2", "--disable_tqdm", "true", "--output_dir", str(output_dir),
        "--ddp_timeout", "60",  # a collective that waits on a lost peer fails well within the test's limit
    )
    assert done.returncode == 0, done.stderr[-3000:]
    lines = [line for line in done.stdout.splitlines() if line.startswith("[process ")]
    assert sorted(line.split("]")[0] for line in lines) == ["[process 0", "[process 1"]
    assert len({line.split("digest ")[1] for line in lines}) == 1
    assert done.stdout.count("results: ") == 1
    results = json.loads((output_dir / "results.json").read_text())
    assert results["config"]["training"]["per_device_train_batch_size"] == 16  # the smoke config's 32, split in two
    assert sum(results["ranks"].values()) == 4 * len(results["ranks"])
    assert results["prune"]["score"] == "svd" and results["prune"]["scope"] == "global"


def test_a_successful_run_leaves_its_process_group(tmp_path):
    """A replica still in its gloo group at exit can abort after writing its results (seen as a failed run)."""
    import torch.distributed as dist

    def main(argv):
        dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)

    assert run_cli(main, []) == 0
    assert not dist.is_initialized()


def test_unknown_table_is_refused():
    done = train_sh("--table", "glue-huge")
    assert done.returncode == 2
    assert done.stderr == (f"error: --table glue-huge: neither a named table ({', '.join(launch.TABLES)}) "
                           "nor a folder of configs\n")


def test_single_config_passes_script_flags_through(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(launch.subprocess, "run", lambda command, **kwargs: commands.append(command))
    launch.main([str(ROOT / "configs/glue/smoke.yaml"), "--seed", "3", "--model_name_or_path", "m"])
    (command,) = commands
    assert command[command.index("--seed") + 1] == "3"
    assert command[command.index("--model_name_or_path") + 1] == "m"


def test_a_smoke_config_run_before_its_data_exists_makes_the_data_first(tmp_path, monkeypatch, capsys):
    """Run from a fresh clone, `bash train.sh configs/glue/smoke.yaml` writes the generated reviews it reads."""
    (tmp_path / "configs/glue").mkdir(parents=True)
    config = tmp_path / "configs/glue/smoke.yaml"
    config.write_text((ROOT / "configs/glue/smoke.yaml").read_text())
    monkeypatch.setattr(launch, "ROOT", tmp_path)
    commands, real_run = [], subprocess.run

    def run(command, **kwargs):
        commands.append(command)
        if "lorpa.tasks.demo_data" in command:  # make the data for real; the training run is only recorded
            return real_run(command, timeout=120, **kwargs)

    monkeypatch.setattr(launch.subprocess, "run", run)
    launch.main([str(config), "--model_name_or_path", "m"])
    launch.main([str(config), "--model_name_or_path", "m"])
    makers = [c for c in commands if "lorpa.tasks.demo_data" in c]
    assert len(makers) == 1 and len(commands) == 3  # made once, then two training runs
    assert ((tmp_path / "runs/smoke-data/train.jsonl").is_file()
            and (tmp_path / "runs/smoke-data/validation.jsonl").is_file())
    assert "making them first" in capsys.readouterr().out


def test_every_generated_input_is_made_by_its_command(tmp_path, monkeypatch):
    """Each smoke config reads from the folder its maker writes, and the maker writes the path that says it ran."""
    for config, (command, marker) in launch.GENERATED_INPUTS.items():
        values = commands.read_config(ROOT / config)
        read = {Path(values[key]).parts[:2] for key in ("train_file", "data_dir", "model_name_or_path")
                if key in values}
        assert read == {Path(command[-1]).parts} == {Path(marker).parts[:2]}, config
    command, marker = launch.GENERATED_INPUTS["configs/clm/smoke.yaml"]
    done = processes.run([sys.executable, ROOT / command[0], tmp_path / "tiny-llama"], timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert (tmp_path / marker.removeprefix("runs/")).is_file()


def test_an_accelerate_config_passes_through_to_every_run_and_cell(tmp_path, monkeypatch):
    """`--accelerate_config` (an FSDP setup) runs each run under `accelerate launch`, locally and in sweeps."""
    config = tmp_path / "fsdp.yaml"
    config.write_text((ROOT / "configs/accelerate/fsdp.yaml").read_text())
    monkeypatch.setattr(commands, "visible_gpus", lambda: 0)
    command = commands.command_for(ROOT / "configs/glue/smoke.yaml", ["--seed", "1"], 1, config)
    assert command[1:7] == ["-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "8"]
    assert command[command.index("--per_device_train_batch_size") + 1] == "4"  # the smoke config's 32 over 8 processes
    assert commands.command_for(ROOT / "configs/glue/smoke.yaml", [], 2, config)[6] == "2"  # --nproc wins
    cells = launch.sweep_cells("minilm-study", [1], ["lora_r8"], tmp_path / "runs", [], config)
    assert all(cell.accelerate_config == config for cell in cells)
    from lorpa.harness.sweep.cells import read_manifest, start_command, write_manifest

    write_manifest(tmp_path / "runs", cells)
    assert [c.accelerate_config for c in read_manifest(tmp_path / "runs")] == [config] * len(cells)
    assert "accelerate.commands.launch" in start_command(read_manifest(tmp_path / "runs")[0], 1)


def test_a_missing_accelerate_config_is_one_line(capsys):
    assert run_cli(launch.main, ["configs/glue/smoke.yaml", "--accelerate_config", "nowhere.yaml"]) == 2
    assert capsys.readouterr().err == ("error: --accelerate_config nowhere.yaml: no such file "
                                       "(see configs/accelerate/fsdp.yaml)\n")


def test_the_study_table_runs_every_row_by_default():
    cells = list(launch.table_cells("minilm-study", ["all"]))
    rows = {name for name, _ in cells}
    assert {"lora_r8", "lora_r64", "magnitude", "svd", "svd_s100", "sensitivity", "iterative_svd"} <= rows
    assert len(cells) == len(list(launch.TABLES["minilm-study"].glob("*/*.yaml")))
    paper = {name for name, _ in launch.table_cells("glue-base", ["all"])}
    assert paper == {name for name, _ in launch.table_cells("glue-base", ["lorpa", "lora"])}
