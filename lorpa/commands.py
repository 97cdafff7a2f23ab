"""`lorpa`: one command for the tools that work on saved adapters and on finished runs.

    lorpa prune ADAPTER OUTPUT_DIR --target_rank 8      (ADAPTER: a folder, or a Hub repo id)
    lorpa inspect ADAPTER
    lorpa check ADAPTER
    lorpa report RUNS_DIR

Each subcommand is also `python -m lorpa.<module>` with the same parser. Nothing heavy is imported until a
subcommand runs: `lorpa --help` and `lorpa SUB --help` answer without torch.
"""

from __future__ import annotations

import importlib
import sys

from .cli import run_cli

SUBCOMMANDS = {  # name: (module, what it does)
    "prune": ("lorpa.prune_adapter", "prune a saved LoRA adapter (a folder or a Hub repo id) into a smaller one"),
    "inspect": ("lorpa.inspect", "per module: the singular spectrum, the energy each rank keeps; the size at each "
                                 "budget"),
    "check": ("lorpa.check_adapter", "will serving engines load and scale the adapter as peft does, and with which "
                                     "--max-lora-rank"),
    "report": ("lorpa.report", "the tables (and rank curve) of a folder of runs' results.json files"),
}


def usage() -> str:
    lines = ["usage: lorpa {" + ",".join(SUBCOMMANDS) + "} ...", "", "subcommands:"]
    lines += [f"  {name:<8} {text}" for name, (_, text) in SUBCOMMANDS.items()]
    lines += ["", "lorpa SUB --help lists a subcommand's flags."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv:
        sys.stderr.write(usage())
        return 2
    if argv[0] in ("-h", "--help"):
        sys.stdout.write(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in SUBCOMMANDS:
        print(f"error: unknown subcommand {name!r}; choose one of {', '.join(SUBCOMMANDS)} (lorpa --help)",
              file=sys.stderr)
        return 2
    module = importlib.import_module(SUBCOMMANDS[name][0])
    return run_cli(lambda arguments: module.main(arguments, prog=f"lorpa {name}"), rest)


if __name__ == "__main__":
    sys.exit(main())
