"""The documentation cannot rot: every config, script and benchmark it names exists, and every flag it shows is
one its command accepts (a flag shown alone must belong to some LoRPA command, or to a tool named below)."""

import ast
import dataclasses
import importlib
import re
import shlex
from functools import cache
from pathlib import Path

import pytest

from lorpa.commands import SUBCOMMANDS
from lorpa.harness.flags import build_parser

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUN_SCRIPTS = ("run_glue.py", "run_summarization.py", "run_clm.py")
PATH = re.compile(r"\b(?:configs|scripts|benchmarks)/[A-Za-z0-9_.\-/]*[A-Za-z0-9_\-/]")
# Flags of other tools the pages show (vLLM, SLURM and submitit, torchrun, pip, accelerate).
EXTERNAL_FLAGS = {"--enable-lora", "--max-lora-rank", "--max-loras", "--lora-modules", "--signal", "--dependency",
                  "--array", "--nproc_per_node", "--standalone", "--no-deps", "--config_file"}


@cache
def parser_flags(command: str) -> frozenset[str]:
    """The option strings a command accepts: run scripts and `python -m lorpa.*` from their real parsers,
    train.sh from its own plus the run scripts' (it passes other flags through), scripts by their source."""
    if command in RUN_SCRIPTS:
        parser = build_parser(importlib.import_module(command.removesuffix(".py")).ARGUMENTS)
    elif command == "train.sh":
        parser = importlib.import_module("lorpa.harness.launch").build_parser()
        return frozenset(options(parser)).union(*(parser_flags(script) for script in RUN_SCRIPTS))
    elif command.startswith("lorpa."):
        module = importlib.import_module(command)
        if not hasattr(module, "build_parser"):
            return frozenset()
        parser = module.build_parser()
    else:
        return source_flags(ROOT / command)
    return frozenset(options(parser))


def options(parser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def source_flags(script: Path) -> frozenset[str]:
    """`add_argument("--flag", ...)` calls of a script that builds its parser inside main()."""
    flags = {"-h", "--help"}
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            flags |= {arg.value for arg in node.args
                      if isinstance(arg, ast.Constant) and str(arg.value).startswith("-")}
    return frozenset(flags)


def code_spans(text: str):
    """(is a fenced bash block, code) for every fenced block and every inline code span."""
    for language, code in re.findall(r"```(\w*)\n(.*?)```", text, re.S):
        yield language in ("bash", "sh", ""), code
    for span in re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", text, flags=re.S)):
        yield False, span


def command_lines(code: str, block: bool):
    """Token lists of the shell commands in a code span, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", code)
    for line in text.splitlines() if block else [text]:
        try:
            tokens = shlex.split(line, comments=block)
        except ValueError:
            tokens = line.split()
        command = []
        for token in tokens + [";"]:
            if token in ("&&", "||", ";", "|"):
                if command:
                    yield command
                command = []
            else:
                command.append(token)


def command_of(tokens: list[str]) -> str | None:
    """run_glue.py, train.sh, lorpa.report, scripts/x.py, ... or None for anything else."""
    if len(tokens) >= 2 and tokens[0] == "bash" and tokens[1].endswith("train.sh"):
        return "train.sh"
    if len(tokens) >= 3 and tokens[0] == "python" and tokens[1] == "-m" and tokens[2].startswith("lorpa."):
        return tokens[2]
    if len(tokens) >= 2 and tokens[0] == "lorpa" and not tokens[1].startswith("-"):  # the console script
        return SUBCOMMANDS[tokens[1]][0] if tokens[1] in SUBCOMMANDS else f"lorpa {tokens[1]}"
    if len(tokens) >= 2 and tokens[0] == "python" and tokens[1].removeprefix("./").endswith(".py"):
        return tokens[1].removeprefix("./")
    return None


def flags_in(tokens) -> list[str]:
    return [token.split("=", 1)[0] for token in tokens if re.match(r"--\w", token)]  # not a rule like ---


def problems(text: str) -> list[str]:
    found = []
    for path in sorted(set(PATH.findall(text))):
        if not (ROOT / path).exists():
            found.append(f"{path} does not exist")
    scripts = [p.relative_to(ROOT).as_posix() for p in (*ROOT.glob("scripts/*.py"), *ROOT.glob("benchmarks/*.py"))]
    known = frozenset(EXTERNAL_FLAGS).union(*(parser_flags(c) for c in (*RUN_SCRIPTS, "train.sh", *scripts)),
                                            *(parser_flags(f"lorpa.{m}") for m in LORPA_COMMANDS))
    for block, code in code_spans(text):
        for tokens in command_lines(code, block):
            command = command_of(tokens)
            if command is None:
                if not block:  # a flag shown alone in prose
                    found += [f"{flag} is no flag of any command" for flag in flags_in(tokens) if flag not in known]
                continue
            if command.startswith("lorpa ") or command.startswith("lorpa.") and command not in {
                    f"lorpa.{m}" for m in LORPA_COMMANDS}:
                found.append(f"{command if ' ' in command else 'python -m ' + command} is not a LoRPA command")
                continue
            if not command.startswith("lorpa.") and command != "train.sh" and not (ROOT / command).is_file():
                found.append(f"{command} does not exist")
                continue
            accepted = parser_flags(command)
            found += [f"{' '.join(tokens[:3])}: {flag} is not one of its flags" for flag in flags_in(tokens)
                      if flag not in accepted]
    return found


# The `python -m lorpa.X` commands users run.
LORPA_COMMANDS = ("prune_adapter", "report", "inspect", "check_adapter", "tasks.demo_data")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_and_flag_a_page_names_exists(page):
    assert problems(page.read_text()) == []


def test_the_readme_stays_a_first_screen():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200


def test_the_checker_catches_a_missing_config_an_unknown_flag_and_an_unknown_command():
    text = """
```bash
bash train.sh configs/glue/no-such-table/rte.yaml --seeds 1 --max_train_samples 8 \\
    --no_such_flag 3
python run_glue.py --task_name rte --lora_rank 8   # a comment --is_not_checked
python -m lorpa.nothing_here --x 1
lorpa prune my-adapter out --target_rank 8 --no_such_flag
lorpa shrink my-adapter
```
Prose may show `--prune_score` alone, but not `--prune_scor`; and `python -m lorpa.report RUNS --paired A`.
"""
    assert problems(text) == [
        "configs/glue/no-such-table/rte.yaml does not exist",
        "bash train.sh configs/glue/no-such-table/rte.yaml: --no_such_flag is not one of its flags",
        "python run_glue.py --task_name: --lora_rank is not one of its flags",
        "python -m lorpa.nothing_here is not a LoRPA command",
        "lorpa prune my-adapter: --no_such_flag is not one of its flags",
        "lorpa shrink is not a LoRPA command",
        "--prune_scor is no flag of any command",
    ]


def test_the_library_page_documents_every_prune_option():
    """A new PruneOptions field must reach the table users read, with its run-script flag where it has one."""
    from lorpa.harness.arguments import PRUNE_FLAGS
    from lorpa.options import PruneOptions

    rows = {line.split("|")[1].strip(" `"): line for line in (ROOT / "docs" / "library.md").read_text().splitlines()
            if line.startswith("| `")}
    for option in dataclasses.fields(PruneOptions):
        assert option.name in rows, f"docs/library.md has no row for PruneOptions.{option.name}"
        flag = PRUNE_FLAGS.get(option.name)
        assert flag is None or f"`--{flag}`" in rows[option.name], f"the row of {option.name} lacks --{flag}"
