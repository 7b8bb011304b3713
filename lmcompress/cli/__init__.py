"""The ``lmcompress`` command line: a thin layer over ``lmcompress.measure.evaluate``."""

from __future__ import annotations

import logging
import sys

import typer

from lmcompress.errors import UserError

app = typer.Typer(
    name="lmcompress",
    help="Compress Hugging Face language models one-shot (pruning, N:M and OWL sparsity, RTN/GPTQ quantization, "
    "structured and low-rank removal), store them packed, and measure what that cost.\n\n"
    "Start with `lmcompress demo`: it builds a tiny model, prunes it and prints what that did.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more detail.")) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


from lmcompress.cli import demo, evaluate, export, factorize, info, prune, quantize, report, search, sweep, unpack  # noqa: E402,F401  (registers the commands)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``lmcompress`` command; ``argv`` defaults to the process arguments."""
    try:
        app(args=argv, prog_name="lmcompress")
    except UserError as exc:
        typer.secho(f"error: {exc}", err=True, fg=typer.colors.RED)
        sys.exit(2)
