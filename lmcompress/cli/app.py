"""The ``lmcompress`` Typer app, its verb order and its top-level options; the verb modules add their commands to it.

It imports typer and :mod:`lmcompress.errors` only, so that ``lmcompress VERB --help`` never loads torch.
"""

from __future__ import annotations

import logging
import os
import sys

import typer
from typer.core import TyperGroup

from lmcompress.errors import UserError

# The verbs in the order `lmcompress --help` lists them, with the line it shows for each (one line at 80 columns).
VERBS = {
    "prune": "Zero weights: unstructured, N:M, OWL; joint with --bits.",
    "quantize": "Quantize weights to 2-8 bits (RTN or GPTQ), stored packed.",
    "shrink": "Remove FFN channels or attention heads: smaller matrices.",
    "drop-experts": "Keep K experts in every mixture-of-experts layer.",
    "merge-experts": "Merge the experts of every MoE layer down to K (MC-SMoE).",
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
