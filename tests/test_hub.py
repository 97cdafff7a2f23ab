"""Adapters where users keep them: `lorpa` with Hub repo ids (read from an offline cache the test builds in the
layout huggingface_hub reads), a truthful model card in every output, and `--push_to_hub` after a sound check."""

import fcntl
import json
import os
import pty
import select
import shutil
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import huggingface_hub
import pytest
import torch
import yaml
from huggingface_hub import constants
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import LlamaConfig, LlamaForCausalLM

from lorpa.cli import run_cli
from lorpa.commands import SUBCOMMANDS
from lorpa.commands import main as lorpa_main

import processes

ROOT = Path(__file__).resolve().parents[1]
BASE_ID = "someone/tiny-llama"


def tiny_lora(r=16, seed=1, base_id=BASE_ID):
    torch.manual_seed(0)
    base = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=32))
    torch.manual_seed(seed)
    config = LoraConfig(r=r, lora_alpha=2 * r, init_lora_weights=False, target_modules="all-linear",
                        task_type="CAUSAL_LM")
    model = get_peft_model(base, config)
    model.peft_config["default"].base_model_name_or_path = base_id  # as from_pretrained of a Hub model records it
    return model


def save_adapter(folder: Path, r=16, seed=1) -> Path:
    tiny_lora(r, seed).save_pretrained(folder)
    (folder / "README.md").write_text("# SOURCE CARD: a rank-16 adapter\n")
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline Hub cache holding owner/name at two revisions: main (rank 16) and v2 (rank 8)."""
    cache = tmp_path / "hub"
    repo = cache / "models--owner--name"
    for ref, sha, rank in (("main", "a" * 40, 16), ("v2", "b" * 40, 8)):
        save_adapter(repo / "snapshots" / sha, r=rank)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(sha)
    no_adapter = cache / "models--owner--notes" / "snapshots" / ("c" * 40)
    no_adapter.mkdir(parents=True)
    (no_adapter / "README.md").write_text("no adapter here\n")
    (cache / "models--owner--notes" / "refs").mkdir()
    (cache / "models--owner--notes" / "refs" / "main").write_text("c" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return repo


def one_error(capsys) -> str:
    errors = capsys.readouterr().err.splitlines()
    assert len(errors) == 1 and errors[0].startswith("error: "), errors
    return errors[0]


def same_adapter(a: Path, b: Path) -> None:
    left, right = load_file(a / "adapter_model.safetensors"), load_file(b / "adapter_model.safetensors")
    assert left.keys() == right.keys() and all(torch.equal(left[k], right[k]) for k in left)
    assert json.loads((a / "adapter_config.json").read_text()) == json.loads((b / "adapter_config.json").read_text())
    assert json.loads((a / "prune_report.json").read_text()) == json.loads((b / "prune_report.json").read_text())


def test_a_repo_id_prunes_as_the_same_folder_given_as_a_path(hub_cache, tmp_path):
    assert run_cli(lorpa_main, ["prune", "owner/name", "from_hub", "--target_rank", "4"]) == 0
    snapshot = hub_cache / "snapshots" / ("a" * 40)
    assert run_cli(lorpa_main, ["prune", str(snapshot), "from_path", "--target_rank", "4"]) == 0
    same_adapter(tmp_path / "from_hub", tmp_path / "from_path")
    card = (tmp_path / "from_hub" / "README.md").read_text()
    assert "owner/name @ aaaaaaaaaaaa" in card and "https://huggingface.co/owner/name" in card


def test_revision_picks_the_other_snapshot_and_inspect_and_check_read_ids(hub_cache, tmp_path, capsys):
    assert run_cli(lorpa_main, ["prune", "owner/name", "out", "--revision", "v2", "--target_rank", "4"]) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert {m["old_rank"] for m in report["modules"].values()} == {8}
    capsys.readouterr()
    assert run_cli(lorpa_main, ["inspect", "owner/name", "--revision", "v2", "--json"]) == 0
    assert {row["rank"] for row in json.loads(capsys.readouterr().out)["modules"].values()} == {8}
    assert run_cli(lorpa_main, ["check", "owner/name"]) == 0
    assert "vLLM: loads it, as peft does; pass --max-lora-rank 16" in capsys.readouterr().out


def test_a_local_folder_wins_over_a_repo_id_spelled_the_same(hub_cache, tmp_path):
    save_adapter(tmp_path / "owner" / "name", r=12)
    assert run_cli(lorpa_main, ["prune", "owner/name", "out", "--target_rank", "4"]) == 0
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    assert {m["old_rank"] for m in report["modules"].values()} == {12}


@pytest.mark.parametrize("argv, expected", [
    (["prune", "owner/missing", "out", "--target_rank", "4"],
     "owner/missing is not in the local cache and the Hub cannot be reached"),
    (["prune", "owner/name", "out", "--revision", "v9", "--target_rank", "4"], "owner/name at revision v9 is not in"),
    (["inspect", "owner/notes"], "owner/notes holds no LoRA adapter (no adapter_config.json)"),
    (["check", "no/such/folder"], "adapter folder no/such/folder not found (and it cannot be a Hub repo id"),
    (["prune", "owner/name", "out", "--target_rank", "4", "--private"], "--private and --push_revision go with"),
    (["prune", "owner/name", "out", "--target_rank", "4", "--push_to_hub", "no repo"], "not a Hub repo id"),
    (["nonsense"], "unknown subcommand 'nonsense'; choose one of prune, inspect, check, report"),
])
def test_hub_inputs_that_cannot_be_had_are_one_line(hub_cache, tmp_path, capsys, argv, expected):
    assert run_cli(lorpa_main, argv) == 2
    assert expected in one_error(capsys)
    assert not (tmp_path / "out").exists()


def test_the_card_is_peft_s_front_matter_and_the_cut_as_the_report_has_it(tmp_path):
    source = save_adapter(tmp_path / "adapter")
    argv = ["prune", str(source), str(tmp_path / "out"), "--energy", "0.9", "--scope", "global", "--alpha", "fold"]
    assert run_cli(lorpa_main, argv) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert "SOURCE CARD" not in text
    front = yaml.safe_load(text.split("---")[1])
    assert front == {"base_model": BASE_ID, "library_name": "peft",
                     "tags": ["lora", "lorpa", f"base_model:adapter:{BASE_ID}"]}
    report = json.loads((tmp_path / "out" / "prune_report.json").read_text())
    rows = [line.split("|")[1:4] for line in text.splitlines()
            if line.startswith("| ") and line.split("|")[1].strip().isdigit()]
    card_ranks = {int(rank): int(count) for rank, count, _ in rows}
    ranks = [m["new_rank"] for m in report["modules"].values()]
    assert card_ranks == {rank: ranks.count(rank) for rank in set(ranks)}
    assert f"| total rank | {sum(m['old_rank'] for m in report['modules'].values())} | {sum(ranks)} |" in text
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    expected = next(v for v in (1, 8, 16, 32, 64) if v >= max(ranks))  # vLLM's values: r is the one to pass
    assert config["r"] == config["lora_alpha"] == expected
    assert f"| vLLM | yes | yes | --max-lora-rank {expected} |" in text

    # written anew when the output is replaced
    argv = ["prune", str(source), str(tmp_path / "out"), "--target_rank", "2", "--overwrite"]
    assert run_cli(lorpa_main, argv) == 0
    text = (tmp_path / "out" / "README.md").read_text()
    assert text.count("---\nbase_model") == 1 and "| 2 | 14 |" in text and "folded" not in text


class FakeHub:
    """huggingface_hub's upload calls, recorded (there is no network here)."""

    def __init__(self, fail=False):
        self.calls, self.fail = [], fail

    def create_repo(self, repo_id, private=False, exist_ok=False, **kwargs):
        self.calls.append(("create_repo", repo_id, private))

    def create_branch(self, repo_id, branch, exist_ok=False, **kwargs):
        self.calls.append(("create_branch", repo_id, branch))

    def upload_folder(self, folder_path, repo_id, revision=None, commit_message="", **kwargs):
        if self.fail:
            raise OSError("connection refused")
        files = sorted(p.name for p in Path(folder_path).iterdir())
        config = json.loads(Path(folder_path, "adapter_config.json").read_text())
        self.calls.append(("upload_folder", repo_id, revision, commit_message, files, config["r"]))
        return f"https://huggingface.co/{repo_id}/commit/0"


@pytest.mark.parametrize("fail", [False, True])
def test_push_to_hub_uploads_the_complete_checked_output(tmp_path, monkeypatch, capsys, fail):
    hub = FakeHub(fail)
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda: hub)
    source = save_adapter(tmp_path / "adapter")
    argv = ["prune", str(source), str(tmp_path / "out"), "--target_rank", "4", "--push_to_hub", "me/small",
            "--private", "--push_revision", "r4"]
    if fail:
        assert run_cli(lorpa_main, argv) == 2
        error = one_error(capsys)
        assert "uploading" in error and "me/small failed (connection refused)" in error
        assert "the output is complete on disk" in error
        assert (tmp_path / "out" / "adapter_model.safetensors").is_file()  # the local output stays
        return
    assert run_cli(lorpa_main, argv) == 0
    assert hub.calls[:2] == [("create_repo", "me/small", True), ("create_branch", "me/small", "r4")]
    _, repo, revision, message, files, rank = hub.calls[2]
    assert (repo, revision, rank) == ("me/small", "r4", 4)
    assert files == ["README.md", "adapter_config.json", "adapter_model.safetensors", "prune_report.json"]
    assert "svd score" in message and "-> 56" in message


def test_every_subcommand_answers_help_without_importing_torch():
    script = ("import sys\nfrom lorpa.commands import main\ntry:\n    code = main(sys.argv[1:])\n"
              "except SystemExit as done:\n    code = done.code\nprint('torch' in sys.modules, code)")
    for argv in ([], *[[name] for name in SUBCOMMANDS]):
        done = processes.run([sys.executable, "-c", script, *argv, "--help"], timeout=60, cwd=ROOT)
        assert done.stdout.splitlines()[-1] == "False 0", (argv, done.stdout[-300:], done.stderr[-300:])
        assert "usage:" in done.stdout


def test_the_installed_console_script_lists_the_subcommands():
    lorpa = shutil.which("lorpa")
    if lorpa is None:  # CI installs the package (scripts/install.sh); a bare checkout has no console script
        pytest.skip("the lorpa console script is not installed (pip install -e .)")
    done = processes.run([lorpa, "--help"], timeout=60)
    assert done.returncode == 0 and all(f"  {name} " in done.stdout for name in SUBCOMMANDS)
    done = processes.run([lorpa, "prune", "--help"], timeout=60)
    assert done.returncode == 0 and "--push_to_hub REPO_ID" in done.stdout and "usage: lorpa prune" in done.stdout


def test_a_terminal_shows_progress_and_a_log_does_not(tmp_path):
    source = save_adapter(tmp_path / "adapter")
    command = [sys.executable, "-m", "lorpa.prune_adapter", str(source), str(tmp_path / "tty"), "--target_rank", "4"]
    read_end, write_end = pty.openpty()
    fcntl.ioctl(write_end, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a terminal 100 columns wide
    process = subprocess.Popen(command, stdin=write_end, stdout=write_end, stderr=write_end, cwd=ROOT,
                               start_new_session=True)
    os.close(write_end)
    output, deadline = b"", time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if not select.select([read_end], [], [], deadline - time.monotonic())[0]:
                pytest.fail("lorpa prune on a terminal did not finish in 120 s")
            try:
                chunk = os.read(read_end, 4096)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            output += chunk
    finally:
        processes.kill_tree(process) if process.poll() is None else process.wait()
        os.close(read_end)
    assert process.returncode == 0 and b"reading" in output and b"writing" in output
    logged = processes.run(command[:-3] + [str(tmp_path / "log"), "--target_rank", "4"], timeout=120, cwd=ROOT)
    assert logged.returncode == 0 and logged.stderr == "" and "pruned 14 LoRA modules" in logged.stdout
