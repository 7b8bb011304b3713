"""The ``lmcompress`` command line: one verb per kind of work, each a thin module over ``lmcompress.jobs``.

The app itself is in :mod:`lmcompress.cli.app`; importing the verb modules here adds their commands to it.
"""

from __future__ import annotations

import atexit
import os
import sys
from contextlib import suppress

import typer

from lmcompress.cli import (  # noqa: F401  (each module adds its command to the app)
    demo,
    evaluate,
    experts,
    export,
    factorize,
    generate,
    info,
    prune,
    quantize,
    report,
    search,
    shrink,
    sweep,
    unpack,
)
from lmcompress.cli.app import VERBS, app
from lmcompress.errors import UserError

__all__ = ["VERBS", "app", "main", "run"]

for _info in app.registered_commands:  # the top-level help shows each verb's line from VERBS
    _name = _info.name or _info.callback.__name__.replace("_", "-")
    _info.short_help = _info.short_help or VERBS.get(_name)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lmcompress`` command; ``argv`` defaults to the process arguments."""
    try:
        app(args=argv, prog_name="lmcompress")
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)


def run() -> None:
    """The process's entry (the ``lmcompress`` script, ``python -m lmcompress``): :func:`main`, then a quick exit.

    When a command has finished (its files written and moved into place), tearing the interpreter down (torch,
    transformers and their thousands of modules) takes about a second more on a CPU. The process skips that
    teardown: it runs the exit handlers (``atexit``: the ``torch.distributed`` process group, logging), flushes
    its streams and ends with the command's exit status. An uncaught exception ends the usual way.
    """
    try:
        main()
        code: int = 0
    except SystemExit as exc:
        if exc.code is None or isinstance(exc.code, int):
            code = exc.code or 0
        else:  # sys.exit("message"): Python prints it and exits with 1
            print(exc.code, file=sys.stderr)
            code = 1
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with suppress(OSError, ValueError):  # closed, or a broken pipe: nothing more can be written anyway
            stream.flush()
    os._exit(code)
