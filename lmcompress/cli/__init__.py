"""The ``lmcompress`` command line: one verb per kind of work, each a thin module over ``lmcompress.jobs``."""

from __future__ import annotations

import atexit
import logging
import os
import sys
from contextlib import suppress

import typer
from typer.core import TyperGroup

from lmcompress.errors import UserError

# The verbs in the order `lmcompress --help` lists them, with the line it shows for each (one line at 80 columns).
VERBS = {
    "prune": "Zero weights: unstructured, N:M, OWL; joint with --bits.",
    "quantize": "Quantize weights to 2-8 bits (RTN or GPTQ), stored packed.",
    "shrink": "Remove FFN channels or attention heads: smaller matrices.",
    "drop-experts": "Keep K experts in every mixture-of-experts layer.",
    "factorize": "Replace linear layers by low-rank factors (SVD).",
    "eval": "Perplexity, sparsity, multiple choice, QA and retrieval.",
    "generate": "Generate text; quantized layers run on CPU kernels.",
    "sweep": "Prune and evaluate a grid of methods × sparsities.",
    "search": "Find per-block sparsity or bits under a budget (EvoPress).",
    "report": "Markdown/HTML report and plots of a sweep or a search.",
    "info": "Size on disk, bits per weight, sparsity, recipe.",
    "unpack": "Copy a packed model to a plain from_pretrained folder.",
    "export": "Export as compressed-tensors (vLLM) or GGUF (llama.cpp).",
    "demo": "Compress SmolLM2-135M four ways and print what each costs.",
}


class _Verbs(TyperGroup):
    """Lists the verbs in :data:`VERBS` order, and shows library errors with the running verb's flags."""

    def list_commands(self, ctx: typer.Context) -> list[str]:
        names = super().list_commands(ctx)
        return [v for v in VERBS if v in names] + [n for n in names if n not in VERBS]

    def invoke(self, ctx: typer.Context):
        try:
            return super().invoke(ctx)
        except UserError as exc:
            command = self.get_command(ctx, ctx.invoked_subcommand) if ctx.invoked_subcommand else None
            if command is None or not exc.params:
                raise
            from lmcompress.cli.options import flag_names

            raise exc.renamed(flag_names(command)) from None


app = typer.Typer(
    name="lmcompress",
    cls=_Verbs,
    rich_markup_mode="markdown",
    help="Compress Hugging Face language models one-shot and measure what that cost. One verb per kind of "
    "work: prune and quantize change weights, shrink, drop-experts and factorize change shapes; eval, sweep "
    "and report measure; info, unpack and export handle the saved folders.\n\n"
    "Start with `lmcompress demo`: it compresses a real 135M model four ways and prints what each cost. "
    "`lmcompress VERB --help` shows each verb's options and examples.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _main(ctx: typer.Context, verbose: bool = typer.Option(False, "--verbose", "-v", help="Log more detail.")) -> None:
    level = logging.DEBUG if verbose else logging.INFO
    if "WORLD_SIZE" in os.environ:  # maybe under torchrun (checked here so that --help need not import torch)
        from lmcompress.calibration import distributed

        distributed.refuse_unsupported(ctx.invoked_subcommand or "")  # under torchrun only prune and quantize run
        if distributed.launched() and os.environ.get("RANK", "0") != "0":  # only rank 0 prints (errors still show)
            level, sys.stdout = logging.WARNING, open(os.devnull, "w")  # noqa: SIM115 (for the process's life)
            from transformers.utils import logging as hf_logging

            hf_logging.disable_progress_bar()  # transformers' loading bars go to stderr
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


from lmcompress.cli import (  # noqa: E402,F401  (registers the commands)
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
