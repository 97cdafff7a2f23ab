"""Child processes of the tests, each with a deadline: one that overruns it is killed together with every
process it started (torchrun puts each replica in a session of its own, so a process group is not
enough), and the test fails at once with the command and the end of its output."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
from pathlib import Path

import pytest


def descendants(pid: int) -> list[int]:
    """Every live process below `pid`, children first found through /proc."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # exited while we looked
                continue
            parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, frontier = [], [pid]
    while frontier:
        children = parents.get(frontier.pop(), [])
        found += children
        frontier += children
    return found


def kill_tree(process: subprocess.Popen) -> None:
    """SIGKILL the process, its process group and everything below it (found before any dies and is reparented)."""
    below = descendants(process.pid)
    for kill in (lambda: os.killpg(process.pid, signal.SIGKILL),
                 *(lambda p=p: os.kill(p, signal.SIGKILL) for p in below)):
        try:
            kill()
        except ProcessLookupError:
            pass
    process.wait()


def start(command: list[str], **kwargs) -> subprocess.Popen:
    """Popen in a new session, so that `kill_tree` reaches everything it starts."""
    return subprocess.Popen([str(part) for part in command], start_new_session=True, **kwargs)


def run(command: list, *, timeout: float, env: dict | None = None, cwd=None) -> subprocess.CompletedProcess:
    """`subprocess.run(command, capture_output=True, text=True)` that cannot hang the suite."""
    process = start(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=cwd)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_tree(process)
        stdout, stderr = process.communicate()
        output = (stdout + stderr)[-6000:]
        pytest.fail(f"{shlex.join(map(str, command))} did not finish in {timeout:g} s; killed it and every process "
                    f"it started. Its output ended:\n{output}", pytrace=False)
    except BaseException:  # the test itself was interrupted (Ctrl-C, pytest-timeout)
        kill_tree(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)
