"""Options shared by several commands."""

import typer

DEVICE = typer.Option("cpu", "--device", help="Where to compute: cpu, cuda or cuda:N.")
DTYPE = typer.Option("float32", "--dtype", help="Dtype to load and compute in: float32, bfloat16 or float16.")
SEQLEN = typer.Option(None, "--seqlen", help="Tokens per window [default: min(2048, model context)].")
TRUST = typer.Option(False, "--trust-remote-code", help="Allow running code from the model's repository.")
PICKLE = typer.Option(False, "--allow-pickle", help="Allow loading pickle (.bin) checkpoints you trust.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
NSAMPLES = typer.Option(128, "--nsamples", help="Number of calibration windows.")
CALIB_SEED = typer.Option(0, "--seed", help="Seed for drawing calibration windows.")
OVERWRITE = typer.Option(False, "--overwrite", help="Replace --output if it exists.")
JSON = typer.Option(False, "--json", help="Print the report as JSON.")


def show_progress(quiet: bool) -> bool:
    """Whether to draw progress bars; ``--quiet`` also silences transformers' own bars and INFO logs."""
    if quiet:
        import logging

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        logging.getLogger().setLevel(logging.WARNING)
    return not quiet
