"""Prune a saved peft LoRA adapter from its files alone: no base model, no GPU.

    lorpa prune ADAPTER_DIR OUTPUT_DIR --target_rank 8 [--score svd] [--scope global]
    python -m lorpa.prune_adapter ADAPTER_DIR OUTPUT_DIR ...            (the same command)

The output is a standard peft adapter (per-module ranks and alphas in `rank_pattern` / `alpha_pattern`) with the
tensors `lorpa.prune` gives on the loaded model, plus `prune_report.json`; every other file of ADAPTER_DIR
(tokenizer, ...) is copied through. The command holds the adapter's factors, never a model. The work (torch, the
file reader) is imported only once the arguments are read, so `--help` and refusals answer at once.
"""

from __future__ import annotations

import argparse
import os
import shlex

from .cli import raise_input_error, run_cli
from .errors import InputError
from .options import FILE_SCORES, PruneOptions, add_prune_arguments, options_from_arguments


def prune_saved_adapter(adapter_dir: str | os.PathLike, output_dir: str | os.PathLike,
                        options: PruneOptions | None = None, *, overwrite: bool = False, **keywords):
    """Prune the adapter saved in `adapter_dir` into `output_dir` as `options` say (`PruneOptions`, or its fields
    as keywords); the default score is svd (no retraining follows this cut). Returns the `PruneReport`.

    Bad input raises `lorpa.InputError` before anything is written; the output appears all at once (written to
    a staging folder beside `output_dir`, then renamed).
    """
    from .adapter_files import AdapterFolder, files_options, pruned_config, write_pruned_adapter
    from .budgets import check_fits
    from .plan import plan_prune

    options, adapter_dir, output_dir = files_options(adapter_dir, output_dir, options, keywords, overwrite)
    if options.tolerance is not None:
        raise InputError("a tolerance budget needs an evaluation of each candidate: give --evaluate COMMAND "
                         "(lorpa.tolerance.prune_saved_adapter_to_tolerance)")
    options.require_budget()
    adapter = AdapterFolder(adapter_dir)
    check_fits(options, {name: (m.rank, m.in_features, m.out_features) for name, m in adapter.modules.items()})
    plan = plan_prune(adapter.module_factors(), options)
    write_pruned_adapter(adapter, plan, output_dir, pruned_config(adapter, plan.report))
    return plan.report


def build_parser(prog: str = "python -m lorpa.prune_adapter") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Prune a saved peft LoRA adapter from its files alone (no base model, no GPU) into a standard "
        "peft adapter with per-module rank_pattern / alpha_pattern and prune_report.json; other files are copied.",
        epilog="The tensors equal lorpa.prune's on the loaded model; the output loads with PeftModel.from_pretrained. "
        f"Scores from files: {', '.join(FILE_SCORES)}.",
    )
    parser.error = raise_input_error
    parser.add_argument("adapter_dir", metavar="ADAPTER_DIR", help="folder written by peft's save_pretrained")
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="new folder for the pruned adapter")
    add_prune_arguments(parser, skip=("rewind",), scores=FILE_SCORES)
    parser.add_argument("--evaluate", default=None, metavar="COMMAND",
                        help="with --tolerance: a command that scores the adapter folder named by {adapter} in it and "
                             "prints the score (higher is better) as the last word of its output, e.g. "
                             "\"python my_eval.py --adapter {adapter}\"")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "python -m lorpa.prune_adapter"):
    """(arguments, PruneOptions), every value checked before any file is read."""
    args = build_parser(prog).parse_args(argv)
    options = options_from_arguments(args)
    if args.evaluate is not None and options.tolerance is None:
        raise InputError("--evaluate scores the candidates of --tolerance; give --tolerance T too")
    if not options.budgets():
        raise InputError("give one of --target_rank, --ratio, --energy, --total_rank or --tolerance")
    try:
        args.evaluate = None if args.evaluate is None else shlex.split(args.evaluate)
    except ValueError as error:
        raise InputError(f"--evaluate: {error}") from None
    return args, options


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.prune_adapter"):
    args, options = parse_args(argv, prog)
    if options.tolerance is not None:
        from .tolerance import prune_saved_adapter_to_tolerance

        report, search = prune_saved_adapter_to_tolerance(args.adapter_dir, args.output_dir, args.evaluate, options,
                                                          overwrite=args.overwrite)
        for candidate in search.candidates:
            print(f"candidate: total rank {candidate.total_rank}, {candidate.parameters} parameters, "
                  f"score {candidate.score:g}")
        capped = "" if search.within else " (none within it: the largest --max_rank allows)"
        print(f"kept total rank {search.kept} of {search.full_rank}: the smallest within {options.tolerance:g} of the "
              f"input's {search.reference:g}{capped}")
    else:
        report = prune_saved_adapter(args.adapter_dir, args.output_dir, options, overwrite=args.overwrite)
    old, new = sum(report.old_ranks.values()), sum(report.ranks.values())
    print(f"pruned {len(report.modules)} LoRA modules, {old} -> {new} rank components "
          f"({report.scope} scope, {report.score} score); wrote {args.output_dir}")
    return report


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
