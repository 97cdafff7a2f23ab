"""What every command shares: bad input (`lorpa.errors.InputError`) as one line and exit status 2, never a traceback.

Nothing here imports torch or transformers: a command's `--help` and its refusals answer at once.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .distributed import leave_process_group
from .errors import InputError


def raise_input_error(message: str):
    """argparse's `parser.error`, which would print the whole usage first: one line instead."""
    raise InputError(message)


def add_adapter_arguments(parser) -> None:
    """ADAPTER (`adapter_dir`) and where to read it: what every command that reads a saved adapter takes."""
    parser.add_argument("adapter_dir", metavar="ADAPTER",
                        help="folder written by peft's save_pretrained, or a Hub repo id (OWNER/NAME)")
    parser.add_argument("--revision", default=None, help="with a Hub repo id: the branch, tag or commit to read")
    parser.add_argument("--subfolder", default=None, help="the adapter's folder inside ADAPTER")


def check_output_file(path: str, flag: str, make_folder: bool = False) -> None:
    """A file a command will write: refused in one line, before any work, when it is a folder, or its folder is
    missing (unless the command makes it: `make_folder`) or not writable."""
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {path} is a folder; give the path of a file to write")
    folder = target.parent
    if not folder.is_dir() and not make_folder:
        raise InputError(f"{flag} {path}: no folder {folder} to write it in")
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise InputError(f"{flag} {path}: {existing} is a file, not a folder")
    if not os.access(existing, os.W_OK | os.X_OK) or (target.exists() and not os.access(target, os.W_OK)):
        raise InputError(f"{flag} {path}: not writable here (check the permissions of {existing})")


def run_cli(main, argv: list[str] | None = None) -> int:
    """Run `main(argv)`; bad input becomes `error: ...` on stderr and exit status 2. A `main` that returns an
    int (a check's verdict) gives that exit status, any other return value 0."""
    try:
        status = main(argv)
    except (InputError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    leave_process_group()  # a replica that exits inside its group can abort after its results are written
    return status if isinstance(status, int) and not isinstance(status, bool) else 0
