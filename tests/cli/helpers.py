"""Running the ``shardstore`` command: in process (``main(argv)``, output captured) for most tests, and
as the real console script in a subprocess for the acceptance tests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from shardstore.cli import main

REPO = Path(__file__).resolve().parents[2]


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """(exit status, stdout, stderr) of ``shardstore argv`` run in this process."""
    capsys.readouterr()
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:  # argparse: --help (0) and usage errors (2)
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys, *argv: str) -> tuple[int, object]:
    code, out, err = cli(capsys, *argv, "--json")
    return code, json.loads(out)


def console_script() -> list[str]:
    """The installed ``shardstore`` script next to this interpreter; in a checkout whose environment was
    installed before the script existed, the same entry point (``shardstore.cli:main``) via ``-m``."""
    script = Path(sys.executable).with_name("shardstore")
    return [str(script)] if script.exists() else [sys.executable, "-m", "shardstore"]


def run_script(*argv: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """The real command in a subprocess, importing this checkout (stdout is a pipe: no progress bars)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([*console_script(), *map(str, argv)], capture_output=True, text=True, env=env,
                          timeout=timeout, check=False)
