"""Prune a saved peft LoRA adapter from its files alone: no base model, no GPU.

    lorpa prune ADAPTER OUTPUT_DIR --target_rank 8 [--score svd] [--scope global] [--push_to_hub OWNER/NAME]
    python -m lorpa.prune_adapter ADAPTER OUTPUT_DIR ...            (the same command)

ADAPTER is a folder or a Hub repo id. The output is a standard peft adapter (per-module ranks and alphas in
`rank_pattern` / `alpha_pattern`) with the tensors `lorpa.prune` gives on the loaded model, `prune_report.json`
and a model card (README.md) that says what the cut did and how each serving engine takes the result; every other
file of the input folder (tokenizer, ...) is copied through, its card is not. The command holds one module's
factors at a time, never a model. The work (torch, the file reader) is imported only once the arguments are read,
so `--help` and refusals answer at once.
"""

from __future__ import annotations

import argparse
import os
import shlex

from .cli import add_adapter_arguments, raise_input_error, run_cli
from .errors import InputError
from .options import FILE_SCORES, PruneOptions, add_prune_arguments, options_from_arguments


def prune_saved_adapter(adapter: str | os.PathLike, output_dir: str | os.PathLike,
                        options: PruneOptions | None = None, *, overwrite: bool = False, revision: str | None = None,
                        subfolder: str | None = None, compare=None, **keywords):
    """Prune the saved adapter `adapter` (a folder, or a Hub repo id at `revision`, in its `subfolder`) into
    `output_dir` as `options` say (`PruneOptions`, or its fields as keywords); the default score is svd (no
    retraining follows this cut). `compare`: a `lorpa.fidelity.AdapterComparison` of the same adapter, whose
    fidelity measure of the output goes into the report and the card. Returns the `PruneReport`.

    Bad input raises `lorpa.InputError` before anything is written; the output appears all at once (written to
    a staging folder beside `output_dir`, then renamed).
    """
    from .adapter_files import AdapterFolder, files_options, pruned_config, write_pruned_adapter
    from .budgets import check_fits
    from .card import model_card_of
    from .hub import resolve_adapter
    from .plan import plan_prune

    source = resolve_adapter(str(adapter), revision, subfolder)
    options, _, output_dir = files_options(source.folder, output_dir, options, keywords, overwrite)
    if options.tolerance is not None:
        raise InputError("a tolerance budget needs an evaluation of each candidate: give --evaluate COMMAND "
                         "(lorpa.tolerance.prune_saved_adapter_to_tolerance)")
    options.require_budget()
    folder = AdapterFolder(source.folder)
    check_fits(options, {name: (m.rank, m.in_features, m.out_features) for name, m in folder.modules.items()})
    plan = plan_prune(folder.module_factors(), options)
    config = pruned_config(folder, plan.report)
    write_pruned_adapter(folder, plan, output_dir, config, model_card_of(folder, plan, config, source, compare))
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
    add_adapter_arguments(parser)
    parser.add_argument("output_dir", metavar="OUTPUT_DIR", help="new folder for the pruned adapter")
    add_prune_arguments(parser, skip=("rewind",), scores=FILE_SCORES)
    parser.add_argument("--evaluate", default=None, metavar="COMMAND",
                        help="with --tolerance: a command that scores the adapter folder named by {adapter} in it and "
                             "prints the score (higher is better) as the last word of its output, e.g. "
                             "\"python my_eval.py --adapter {adapter}\"")
    parser.add_argument("--base_model", default=None, metavar="MODEL",
                        help="with --calibration_data: measure the output's fidelity to ADAPTER (top-1 agreement, KL) "
                             "on the base model, and allow --tolerance_metric agreement or kl (a Hub id or folder)")
    parser.add_argument("--calibration_data", default=None, metavar="FILE",
                        help="rows to compare answers on: JSONL with a text field (or prompt and response), or plain "
                             "text, one row a line")
    parser.add_argument("--calibration_rows", type=int, default=256, help="how many rows of --calibration_data")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUTPUT_DIR")
    parser.add_argument("--push_to_hub", default=None, metavar="REPO_ID",
                        help="upload OUTPUT_DIR to this Hub repo once it is complete and lorpa check found its shapes "
                             "sound (created if missing)")
    parser.add_argument("--private", action="store_true", help="with --push_to_hub: create the repo private")
    parser.add_argument("--push_revision", default=None, metavar="BRANCH",
                        help="with --push_to_hub: the branch to push to (created if missing; default: main)")
    return parser


def parse_args(argv: list[str] | None = None, prog: str = "python -m lorpa.prune_adapter"):
    """(arguments, PruneOptions), every value checked before any file is read."""
    args = build_parser(prog).parse_args(argv)
    options = options_from_arguments(args)
    if args.evaluate is not None and options.tolerance is None:
        raise InputError("--evaluate scores the candidates of --tolerance; give --tolerance T too")
    if (args.base_model is None) != (args.calibration_data is None):
        raise InputError("--base_model and --calibration_data go together: the fidelity is measured on the base model "
                         "with the adapters, on those rows")
    if args.calibration_rows < 1:
        raise InputError(f"--calibration_rows must be a positive integer, got {args.calibration_rows}")
    metric = options.search_metric(args.evaluate is not None)
    if options.tolerance is not None and metric != "score" and args.base_model is None:
        raise InputError("--tolerance needs --evaluate COMMAND (a labelled score), or --base_model and "
                         "--calibration_data for a label-free --tolerance_metric (agreement, kl)")
    if metric == "score" and options.tolerance is not None and args.evaluate is None:
        raise InputError("--tolerance_metric score needs --evaluate COMMAND, which prints a score for the adapter "
                         "folder {adapter}")
    if (args.private or args.push_revision) and not args.push_to_hub:
        raise InputError("--private and --push_revision go with --push_to_hub REPO_ID")
    if args.push_to_hub is not None:
        from .hub import could_be_repo_id

        if not could_be_repo_id(args.push_to_hub) or "/" not in args.push_to_hub:
            raise InputError(f"--push_to_hub {args.push_to_hub}: not a Hub repo id (OWNER/NAME)")
    if not options.budgets():
        raise InputError("give one of --target_rank, --ratio, --energy, --total_rank or --tolerance")
    try:
        args.evaluate = None if args.evaluate is None else shlex.split(args.evaluate)
    except ValueError as error:
        raise InputError(f"--evaluate: {error}") from None
    return args, options


def main(argv: list[str] | None = None, prog: str = "python -m lorpa.prune_adapter"):
    args, options = parse_args(argv, prog)
    where = dict(overwrite=args.overwrite, revision=args.revision, subfolder=args.subfolder)
    compare = None
    if args.base_model is not None:
        from .fidelity import AdapterComparison
        from .hub import resolve_adapter

        source = resolve_adapter(args.adapter_dir, args.revision, args.subfolder).folder
        compare = AdapterComparison(args.base_model, source, args.calibration_data, args.calibration_rows)
    if options.tolerance is not None:
        from .tolerance import prune_saved_adapter_to_tolerance

        evaluate = args.evaluate if args.evaluate is not None else compare
        report, search = prune_saved_adapter_to_tolerance(args.adapter_dir, args.output_dir, evaluate, options,
                                                          **where)
        for candidate in search.candidates:
            print(f"candidate: total rank {candidate.total_rank}, {candidate.parameters} parameters, "
                  f"{search.metric} {candidate.score:g}")
        capped = "" if search.within else " (none qualifies: the largest --max_rank allows)"
        print(f"kept total rank {search.kept} of {search.full_rank}: the smallest with {search.metric} "
              f"{'within ' if search.metric == 'score' else ''}{options.tolerance:g}{capped}")
    else:
        report = prune_saved_adapter(args.adapter_dir, args.output_dir, options, compare=compare, **where)
    old, new = sum(report.old_ranks.values()), sum(report.ranks.values())
    print(f"pruned {len(report.modules)} LoRA modules, {old} -> {new} rank components "
          f"({report.scope} scope, {report.score} score); wrote {args.output_dir}")
    if report.fidelity is not None:
        from .fidelity import Fidelity

        print(f"fidelity to {args.adapter_dir}: {Fidelity(**report.fidelity).describe()}")
    if args.push_to_hub is not None:
        print(f"pushed: {push(args, report, old, new)}")
    return report


def push(args, report, old: int, new: int) -> str:
    """Upload the finished output, once `lorpa check` finds every module's shapes as its config says."""
    from pathlib import Path

    from .check_adapter import check_adapter
    from .hub import push_folder

    checks, _ = check_adapter(args.output_dir)
    broken = [check.name for check in checks if check.breaks_peft]
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise InputError(f"not pushed: lorpa check finds {broken[0]}{more} unlike its config; the output is in "
                         f"{args.output_dir}")
    message = (f"Prune {args.adapter_dir} with LoRPA: {report.score} score, {report.scope} scope, total rank {old} -> "
               f"{new}")
    return push_folder(Path(args.output_dir), args.push_to_hub, private=args.private, revision=args.push_revision,
                       message=message)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
