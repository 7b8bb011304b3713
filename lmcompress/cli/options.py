"""Options shared by several commands, and the checks that refuse options a command's mode does not use."""

from __future__ import annotations

import typer

from lmcompress.errors import UserError
from lmcompress.job_options import DEFAULT_PERCDAMP, JobOptions
from lmcompress.job_options import names as job_option_names

JOB = JobOptions()  # the library's defaults, which the shared options below take as theirs

DEVICE = typer.Option(JOB.device, "--device", help="Where to compute: cpu, cuda or cuda:N.")
DTYPE = typer.Option(JOB.dtype, "--dtype", help="Dtype to load and compute in: float32, bfloat16 or float16.")
SEQLEN = typer.Option(JOB.seqlen, "--seqlen", help="Tokens per window [default: min(2048, model context)].")
TRUST = typer.Option(
    JOB.trust_remote_code, "--trust-remote-code", help="Allow running code from the model's repository."
)
PICKLE = typer.Option(JOB.allow_pickle, "--allow-pickle", help="Allow loading pickle (.bin) checkpoints you trust.")
QUIET = typer.Option(False, "--quiet", "-q", help="No progress bars.")
NSAMPLES = typer.Option(JOB.nsamples, "--nsamples", help="Number of calibration windows.")
CALIB_SEED = typer.Option(JOB.seed, "--seed", min=0, max=2**32 - 1, help="Seed for drawing calibration windows.")
OVERWRITE = typer.Option(JOB.overwrite, "--overwrite", help="Replace --output if it exists.")
JSON = typer.Option(False, "--json", help="Print the report as JSON.")
OFFLOAD = typer.Option(
    JOB.offload,
    "--offload",
    help="none: load the whole model; disk: stream it block by block from its safetensors shards (memory: about "
    "one block); auto: disk when the model would not fit in available memory.",
)
OFFLOAD_NONE = typer.Option(
    "none", "--offload", help="none (this command holds the whole model in memory; only prune and quantize stream)."
)
RESUME = typer.Option(
    JOB.resume, "--resume", help="Continue a killed streamed run from its last finished block (same settings)."
)
IN_BLOCK = typer.Option(
    "sequential",
    "--in-block",
    help="Order of the layers inside a block. sequential: each group (q/k/v, o, gate/up, down) is solved when "
    "the block's forward reaches it, so it sees the outputs of the layers compressed before it (GPTQ's \"true "
    "sequential\"; one forward per block). parallel: every layer sees the block's uncompressed inputs (the "
    "SparseGPT and Wanda papers' order; two forwards per block; what `lmcompress search` assumes).",
)
CALIB_SOURCES = "text file, wikitext2, c4, ptb, hf:NAME[:CONFIG][@SPLIT] or bundled:wikitext2-valid"


def calib_data(what: str = "Calibration text") -> typer.models.OptionInfo:
    """The ``--calib-data`` option (default c4), its help starting with ``what``."""
    return typer.Option(JOB.calib_data, "--calib-data", help=f"{what}: {CALIB_SOURCES}.")


def percdamp(solver: str) -> typer.models.OptionInfo:
    """The ``--percdamp`` option of ``solver`` (GPTQ, SparseGPT): a number or ``auto``, checked by the job's config."""
    return typer.Option(
        str(DEFAULT_PERCDAMP),
        "--percdamp",
        help=f"{solver} dampening λ = p · mean(diag H): p in [0, 1), or auto (0.01, and 0.1 for a layer with more "
        "inputs than calibration tokens; docs/quantization.md).",
    )


# The options that only matter when a job draws calibration windows.
CALIBRATION = ("calib_data", "nsamples", "seqlen", "seed")

# Library parameter names that a command spells differently (SweepConfig.allocations is `sweep --allocation`,
# the held-out windows draw() cuts for a search are `search --fitness-windows`).
PARAM_ALIASES = {"allocations": "allocation", "patterns": "pattern", "held_out": "fitness_windows"}


def flag_names(command) -> dict[str, str]:
    """Parameter name → the flag that sets it in ``command`` (``group_size`` → ``--group-size``).

    Library errors name their parameters the way the Python API does (:class:`lmcompress.errors.UserError`);
    this table lets the CLI show them as the flags of the running command. Arguments keep their names.
    """
    names: dict[str, str] = {}
    for param in command.params:
        if getattr(param, "param_type_name", None) == "option" and param.name:
            long = [o for o in param.opts if o.startswith("--")]
            names[param.name] = long[0] if long else param.opts[0]
    for alias, name in PARAM_ALIASES.items():
        if name in names:
            names.setdefault(alias, names[name])
    return names


def given(ctx: typer.Context, *names: str) -> list[str]:
    """Those of ``names`` (parameter names) that the user set on the command line or through the environment."""
    # typer vendors its own click, so the source is compared by name ("COMMANDLINE", "ENVIRONMENT", "DEFAULT"...)
    sources = {n: ctx.get_parameter_source(n) for n in names}
    return [n for n, src in sources.items() if src is not None and src.name not in ("DEFAULT", "DEFAULT_MAP")]


def flags(ctx: typer.Context, names: list[str]) -> str:
    """``["owl_m", "owl_lambda"]`` → ``"--owl-m, --owl-lambda"`` for the running command."""
    table = flag_names(ctx.command)
    return ", ".join(table.get(n, n) for n in names)


def refuse(ctx: typer.Context, names: tuple[str, ...] | list[str], why: str) -> None:
    """A UserError naming those of ``names`` that the user gave explicitly: in this mode they would do nothing.

    ``why`` completes the sentence "<flags> do(es) not apply ...", e.g. "without --allocation owl". Options left
    at their defaults are never refused, so a mode can ignore them silently.
    """
    bad = given(ctx, *names)
    if bad:
        verb = "does" if len(bad) == 1 else "do"
        raise UserError(f"{flags(ctx, bad)} {verb} not apply {why}")


def show_progress(quiet: bool) -> bool:
    """Whether to draw progress bars; ``--quiet`` also silences transformers' own bars and INFO logs."""
    if quiet:
        import logging

        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        logging.getLogger().setLevel(logging.WARNING)
    return not quiet


# The options every whole job takes (lmcompress.job_options.JobOptions, whose defaults are the library's), by name.
JOB_KEYS = tuple(k for k in job_option_names() if k != "progress")


def job_options(values: dict) -> dict:
    """The options every whole job takes (:class:`lmcompress.job_options.JobOptions`), from a verb's parameter
    values; ``progress`` from ``--quiet``."""
    return {k: values[k] for k in JOB_KEYS if k in values} | {"progress": show_progress(values.get("quiet", False))}
