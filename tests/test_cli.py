"""The command line's shape: lazy command table, fast start (no heavy imports for `info`), unit parsing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipuzzle.errors import UserError
from minipuzzle.units import gib, parse_bytes, parse_context, parse_count, parse_count_or_fraction

HEAVY = ("torch", "transformers", "matplotlib", "datasets", "lm_eval", "highspy")

_PROBE = """
import json, sys
sys.argv = ["minipuzzle", *sys.argv[1:]]
from minipuzzle.cli import main
try:
    main()
except SystemExit as e:
    assert not e.code, e.code
heavy = sorted({m.split(".")[0] for m in sys.modules} & set(json.loads(sys.stdin.readline())))
print("HEAVY=" + json.dumps(heavy))
"""


@pytest.mark.parametrize("args", [["--help"], ["info", "56b", "--precision", "fp4", "--context", "1M"], ["report", "--help"]])
def test_help_and_info_load_no_heavy_module(args):
    res = subprocess.run([sys.executable, "-c", _PROBE, *args], input=json.dumps(HEAVY) + "\n", capture_output=True,
                         text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip().splitlines()[-1] == "HEAVY=[]"
    assert "Commands" in res.stdout or "parameters" in res.stdout or "RUN_DIR" in res.stdout


def test_lazy_table_matches_the_command_modules():
    from minipuzzle.cli import LAZY_COMMANDS, commands_of

    for module in {m for m, _ in LAZY_COMMANDS.values()}:
        declared = commands_of(module)
        assert set(declared) == {n for n, (m, _) in LAZY_COMMANDS.items() if m == module}, module
        for name, cmd in declared.items():
            first_paragraph = " ".join(cmd.help.split("\n\n")[0].split())
            assert LAZY_COMMANDS[name][1] == first_paragraph, name


def test_lazy_command_runs_and_reports_user_errors(tmp_path):
    from minipuzzle.testing import run_cli

    code, out, _ = run_cli(["search", "--help"])
    assert code == 0 and "--scores" in out
    code, _, err = run_cli(["search", "56b", "--scores", str(tmp_path), "-o", str(tmp_path / "l.yaml"),
                            "--memory", "3 parsecs"])  # fmt: skip
    assert code == 2 and "--memory" in err and len(err.strip().splitlines()) == 1


def test_gib_quotes_bytes_in_binary_units_to_two_digits():
    assert [gib(80 * 2**30), gib(23.5 * 2**30), gib(150.4 * 2**30), gib(512 * 2**20), gib(1.3 * 2**20)] == [
        "80 GiB", "23.5 GiB", "150 GiB", "512 MiB", "1.3 MiB"]  # fmt: skip
    assert [gib(676 * 2**10), gib(100), gib(0), gib(None)] == ["676 KiB", "100 B", "0 MiB", "–"]
    # Read back by the size parser, every figure is within 5 % (one decimal below 10 units, none from 100).
    for n in [1, 1000, 5 * 10**6, 7 * 2**20 + 1, 3 * 10**10, 11 * 2**30 + 12345, 7 * 10**12]:
        assert abs(parse_bytes(gib(n)) - n) <= 0.05 * n, (n, gib(n))


def test_units():
    assert parse_count("63B", "--tokens") == 63 * 10**9
    assert parse_count("7e9") == 7 * 10**9 and parse_count("500M") == 500 * 10**6 and parse_count("1000") == 1000
    assert parse_context("1M") == 2**20 and parse_context("8k") == 8192 and parse_context("4096") == 4096
    assert parse_bytes("31.7GiB") == int(31.7 * 2**30) and parse_bytes("32GB") == 32 * 10**9
    assert parse_bytes("500MiB") == 500 * 2**20 and parse_bytes(1234) == 1234 and parse_bytes("5gb") == 5 * 10**9
    assert parse_count_or_fraction("6.5b", "--target") == 6_500_000_000
    assert parse_count_or_fraction("80%", "--target") == pytest.approx(0.8)
    assert parse_count_or_fraction("0.8", "--target") == 0.8
    for call, needle in [
        (lambda: parse_count("lots", "--tokens"), "--tokens"),
        (lambda: parse_context("0"), "at least 1"),
        (lambda: parse_bytes("3 parsecs", "--memory"), "--memory"),
        (lambda: parse_bytes("0GB", "--max-shard-size"), "positive"),
        (lambda: parse_count_or_fraction("150%", "--target"), "(0, 1]"),
        (lambda: parse_count_or_fraction("-3", "--target"), "(0, 1]"),
    ]:
        with pytest.raises(UserError, match=needle.replace("(", r"\(").replace("]", r"\]")):
            call()


def test_progress_helpers(capsys):
    from minipuzzle.progress import ProgressBar, progress_bar, track

    assert list(track(iter(range(5)), "items")) == list(range(5))
    with progress_bar("work", 3) as advance:
        advance(3)
    with ProgressBar("distill", 4, completed=1, status="loss {task.fields[loss]}", loss="-") as bar:
        bar.update(4, loss="0.125")
    err = capsys.readouterr().err
    assert "items" in err and "5/5" in err and "3/3" in err and "loss 0.125" in err and "4/4" in err
    assert list(track([1, 2], "quiet", enabled=False)) == [1, 2]
    with progress_bar("quiet", 2, enabled=False) as advance:
        advance(2)
    assert capsys.readouterr().err == ""
