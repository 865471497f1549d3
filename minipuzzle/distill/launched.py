"""A launched distillation's processes, their logs, and the one line that says why a launch failed.

A launch runs in a log folder of its own: `launcher.log` holds what the launched process (the child, or torchrun's
launcher) wrote on stderr, also shown on this terminal; under torchrun each rank's stdout and stderr are kept by
torchrun itself under `ranks/<run id>/attempt_<n>/<local rank>/{stdout,stderr}.log` (and shown here, prefixed).
When the launch fails, the logs say which process failed and why: a rank that printed `error: ...` (the CLI's
user error, exit 2) is the user's cause; otherwise the first rank to die with a traceback is taken as the root
cause (the others die because it left their collectives). Its traceback stays in its log; the message names it.

    run_logged(cmd, log_file, ranks) -> exit code
    failure(code, folder, processes, what) -> UserError | LaunchError (one line, naming the log)
"""

from __future__ import annotations

import codecs
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from minipuzzle.errors import LaunchError, UserError

# CSI escape sequences (colours, cursor moves) of a live progress bar: not part of any error line.
_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
# torchrun's --tee prefix of a rank's line on the launcher's stream, its role and local rank: "[default0]:" (its
# failure summary's "[0]:" is not one).
_RANK_PREFIX = re.compile(r"^\[[A-Za-z_]\w*?\d+\]:")
_TRACEBACK = "Traceback (most recent call last):"


@dataclass(frozen=True)
class Found:
    """The error a log ends with: `line` (one line), `user` when it is the CLI's user error (exit 2)."""

    line: str
    user: bool


def run_logged(cmd: list[str], log_file: Path, ranks: bool) -> int:
    """Run `cmd`; its stderr goes both to this process's stderr and to `log_file` (stdout is inherited).
    Returns the exit code. `ranks`: `cmd` is torchrun with --tee, whose own traceback on a rank's failure (the
    launcher's view of it, which names no cause) is kept in the log and not shown; the ranks' lines are shown.
    Raises `UserError` when `cmd` cannot start at all (its interpreter gone)."""
    env = None
    if not ranks and sys.stderr.isatty():
        # A child's stderr is a pipe: rich would draw its progress bar only at the end. It is shown on a terminal.
        env = dict(os.environ, TTY_COMPATIBLE="1", TTY_INTERACTIVE="1")
    log_file.parent.mkdir(parents=True, exist_ok=True)
    try:
        proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, env=env)
    except OSError as e:
        raise UserError(f"cannot start the distillation: {cmd[0]}: {e.strerror} (the interpreter this "
                        f"minipuzzle runs in)") from None  # fmt: skip
    with proc, open(log_file, "wb") as log:
        _copy(proc, log, ranks)
    return proc.returncode


def _copy(proc: subprocess.Popen, log, ranks: bool) -> None:
    """Copy the child's stderr to `log` and to this process's stderr until it closes."""
    decode = codecs.getincrementaldecoder("utf-8")(errors="replace")
    own_traceback = False
    fd = proc.stderr.fileno()
    while chunk := (proc.stderr.readline() if ranks else os.read(fd, 65536)):
        log.write(chunk)
        log.flush()
        text = decode.decode(chunk)
        if ranks and not _RANK_PREFIX.match(text):
            own_traceback = own_traceback or text.startswith(_TRACEBACK)
            if own_traceback:
                continue
        sys.stderr.write(text)
        sys.stderr.flush()


def error_in(text: str) -> Found | None:
    """The error `text` (a process's stderr) ends with: its last `error: ...` line (the CLI's user error), else
    the exception line of its last traceback, else a `No module named` line; None when it shows none."""
    lines = [_ANSI.sub("", raw).split("\r")[-1].rstrip() for raw in text.splitlines()]
    users = [ln for ln in lines if ln.startswith("error: ")]
    if users:
        return Found(users[-1].removeprefix("error: "), user=True)
    starts = [i for i, ln in enumerate(lines) if ln.startswith(_TRACEBACK)]
    if starts:
        after = [ln for ln in lines[starts[-1] + 1 :] if ln and not ln[0].isspace()]
        if after:
            return Found(after[0], user=False)
    missing = [ln for ln in lines if "No module named" in ln]
    return Found(missing[-1], user=False) if missing else None


def rank_logs(ranks_dir: Path) -> dict[str, Path]:
    """{rank's local index: its stderr.log} of the latest attempt under torchrun's `--log-dir`."""
    attempts = sorted(ranks_dir.glob("*/attempt_*"), key=lambda p: int(p.name.removeprefix("attempt_")))
    if not attempts:
        return {}
    return {p.parent.name: p for p in sorted(attempts[-1].glob("*/stderr.log"), key=lambda p: int(p.parent.name))}


def failure(code: int, folder: Path, processes: int, what: str = "distillation") -> UserError | LaunchError:
    """The one-line error of a launch in log folder `folder` that exited with `code`: which process failed, its
    error and its log. `UserError` (exit 2) when the failing process reported a user error, else `LaunchError`."""
    launcher = folder / "launcher.log"
    logs = rank_logs(folder / "ranks") if processes > 1 else {}
    found = [(r, p, f) for r, p in logs.items() if (f := error_in(_read(p)))]
    if found:
        # The user's cause first; else the rank whose log stopped growing first: it died, the others followed.
        rank, path, f = min(found, key=lambda x: (not x[2].user, x[1].stat().st_mtime_ns))
        msg = f"{what} rank {rank} of {processes} failed: {f.line} (its log: {path})"
        return UserError(msg) if f.user else LaunchError(msg)
    f = error_in(_read(launcher)) if not logs else None
    how = "under torchrun" if processes > 1 else "in its own process"
    if f is not None:
        msg = f"{what} {how} failed: {f.line} (its log: {launcher})"
        return UserError(msg) if f.user and code == 2 else LaunchError(msg)
    return LaunchError(f"{what} {how} exited with code {code} and logged no error (logs: {folder}); "
                       f"rerun to resume")  # fmt: skip


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""
