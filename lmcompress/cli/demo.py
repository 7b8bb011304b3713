"""``lmcompress demo``."""

from __future__ import annotations

import typer

from lmcompress.cli import app, options


@app.command()
def demo(
    steps: int = typer.Option(300, "--steps", help="Training steps for the tiny model (more: better model)."),
    keep: str = typer.Option(None, "--keep", help="Keep the demo's model folders here instead of a temp dir."),
    quiet: bool = options.QUIET,
) -> None:
    """Train a tiny model on bundled WikiText-2 text, prune it with every method, print a table.

    Needs no network and no arguments; takes a few minutes on a laptop CPU.
    """
    from lmcompress.demo import format_table, run_demo

    rows = run_demo(steps=steps, keep=keep, progress=options.show_progress(quiet))
    typer.echo("\nTiny LLaMA-style model (4 blocks, d=128), perplexity on a WikiText-2 test slice:\n")
    typer.echo(format_table(rows))
    typer.echo(
        "\nRead this table as a check that everything runs, not as a ranking of the methods: the model has under a"
        "\nmillion parameters and is trained for a few minutes on 60 kB of text, much of which it memorizes, so"
        "\npruning can even lower its test perplexity. `python -m bench prune` compares the methods on a model"
        "\ntrained on all of WikiText-2 valid (there SparseGPT beats Wanda and magnitude, and OWL beats uniform"
        "\nat 70%; bench/README.md has the numbers). Then run lmcompress on your own model: lmcompress --help."
    )
