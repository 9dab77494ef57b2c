"""The thin CLI: every sub-command is declared once, on the function it runs, and `augbench --help` lists each with
one line."""

from __future__ import annotations

import subprocess
import sys

from conftest import subprocess_env


def test_every_command_function_is_declared_once_and_listed_with_one_line_of_help() -> None:
    from augbench import cli

    runners = {name for name in vars(cli) if name.startswith("cmd_")}
    declared = {fn.__name__ for _, fn, _ in cli.COMMANDS.values()}
    assert declared == runners, f"functions without a sub-command: {runners - declared}"
    res = subprocess.run([sys.executable, "-m", "augbench", "--help"], capture_output=True, text=True, env=subprocess_env(),
                         timeout=60)
    assert res.returncode == 0, res.stderr
    for name, (help_text, _, _) in cli.COMMANDS.items():
        assert "\n" not in help_text and len(help_text) < 120, name
        assert f"    {name} " in res.stdout or f"    {name}\n" in res.stdout, name
    # each sub-command parses its own options (a declaration that lost one would fail here, not in a job)
    p = cli.parser()
    a = p.parse_args(["decode", "--table", "t.parquet", "--size", "32", "--out", "o"])
    assert a.fn is cli.cmd_decode and a.table == "t.parquet" and a.manifest is None and a.threads == 1
    res = subprocess.run([sys.executable, "-m", "augbench", "decode", "--size", "32", "--out", "o"], capture_output=True,
                         text=True, env=subprocess_env(), timeout=60)
    assert res.returncode == 2 and "one of the arguments --table --manifest is required" in res.stderr
