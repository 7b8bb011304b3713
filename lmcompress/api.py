"""The Python API behind the CLI: whole jobs from a model name to a saved, described result."""

from __future__ import annotations

import logging
from pathlib import Path

from lmcompress.config import PruneConfig, QuantConfig
from lmcompress.data import eval_windows, load_text
from lmcompress.errors import UserError
from lmcompress.evaluate import perplexity
from lmcompress.families import is_encoder
from lmcompress.io import load_model, read_recipe, save_model, source_dtype
from lmcompress.jobs import calibration as calibration  # re-exported: part of the documented API
from lmcompress.jobs import check_device, open_job, resolve_seqlen
from lmcompress.pruning import PruneReport, measure_sparsity
from lmcompress.pruning import prune as prune_model
from lmcompress.quantization import QuantReport, check_group_size, save_quantized
from lmcompress.quantization import quantize as quantize_model

log = logging.getLogger(__name__)


def prune_pretrained(
    model: str | Path,
    config: PruneConfig,
    output: str | Path,
    *,
    progress: bool = True,
    save_format: str = "dense",
    **options,
) -> PruneReport:
    """Load ``model``, prune it as ``config`` says, and save it with its recipe to ``output``.

    ``options`` are those of :func:`lmcompress.jobs.open_job` (``calib_data``, ``nsamples``, ``seqlen``, ``seed``,
    ``device``, ``dtype``, ``overwrite``, ``trust_remote_code``, ``allow_pickle``). Every input is checked before
    any work; the result is written to a temporary folder and renamed into place at the end, and the source
    model is never written to. ``save_format``: ``dense`` (loads with plain ``from_pretrained``) or ``packed``
    (zeros stored as a bitmask / N:M layout: a smaller file that loads with ``lmcompress.load``; see
    docs/storage.md). Joint quantization (``config.bits``) always saves packed.
    """
    if save_format not in ("dense", "packed"):
        raise UserError(f"unknown --save-format {save_format!r}: choose dense or packed")
    config.validate()
    job = open_job(model, output, needs_calibration=config.needs_calibration, **options)
    report = prune_model(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        **config.to_dict(),
        "achieved_sparsity": report.sparsity,
        "block_targets": report.block_targets,
        "layer_sparsity": report.layer_sparsity,
        "outlier_ratios": report.outlier_ratios,
        "damping_raised": report.damping,
        "prune_time_s": report.wall_time_s,
    }
    save = {"overwrite": options.get("overwrite", False), "dtype": source_dtype(job.model.config)}
    if report.quantized is not None:  # joint prune + quantize (--bits): store the codes packed
        recipe = job.recipe("prune", {**fields, "mask_sparsity": report.mask_sparsity})
        save_quantized(job.model, job.tokenizer, output, recipe, report.quantized, **save)
    elif save_format == "packed":
        from lmcompress.storage import save_packed

        save_packed(job.model, job.tokenizer, output, job.recipe("prune", fields), **save)
    else:
        save_model(job.model, job.tokenizer, output, job.recipe("prune", fields), **save)
    return report


def quantize_pretrained(
    model: str | Path, config: QuantConfig, output: str | Path, *, progress: bool = True, **options
) -> QuantReport:
    """Load ``model``, quantize its block linear layers as ``config`` says, and save it packed to ``output``.

    ``options`` as for :func:`prune_pretrained`. Inputs are checked before any work (the group size against the
    layer widths right after loading); nothing is written unless the whole job succeeds, and the source model
    is never written to.
    """
    config.validate()
    job = open_job(
        model,
        output,
        needs_calibration=config.needs_calibration,
        check_model=lambda net: check_group_size(net, config.group_size),
        **options,
    )
    report = quantize_model(job.model, config, job.calib, device=job.device, progress=progress)
    fields = {
        "quantization": config.to_dict(),
        "quantized_layers": len(report.quantized),
        "quantized_weights": report.weights,
        "nominal_bits_per_weight": report.nominal_bits_per_weight,
        "layer_loss": report.layer_loss,
        "damping_raised": report.damping,
        "quantize_time_s": report.wall_time_s,
    }
    save_quantized(
        job.model,
        job.tokenizer,
        output,
        job.recipe("quantize", fields),
        report.quantized,
        overwrite=options.get("overwrite", False),
        dtype=source_dtype(job.model.config),
    )
    return report


def evaluate_pretrained(
    model: str | Path,
    ppl_data: str | None = "wikitext2",
    *,
    tasks: str | None = None,
    harness: str | None = None,
    limit: int | None = None,
    shots: int = 0,
    seed: int = 0,
    batch_size: int = 16,
    retrieval_lengths: list[int] | None = None,
    seqlen: int | None = None,
    device: str = "cpu",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    progress: bool = True,
    reference: str | None = None,
    pooling: str | None = None,
) -> dict:
    """Perplexity of a model (dense or compressed) and the sparsity measured in its weights.

    ``tasks`` (``"ppl:FILE,mc:TASK,qa:TASK,retrieval"``) and ``harness`` (lm-evaluation-harness task names) add
    the evaluations of ``lmcompress.tasks``; the result then also has ``tasks``, ``metrics`` and
    ``higher_is_better`` (see docs/evaluation.md), and the perplexity keys come from the first ``ppl`` task.

    Encoders (BERT-style) get MLM perplexity (if they have the head) and, against ``reference`` (or the
    recipe's local source model), sentence-embedding cosine similarity: see ``lmcompress.encoder_eval``.
    """
    check_device(device)
    net, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen)
    if tasks or harness or limit is not None:  # lmcompress.tasks; ppl_data, if given, is one more task
        if is_encoder(net.config):
            raise UserError("--tasks, --harness and --limit evaluate causal LMs; for encoders use --ppl-data only")
        from lmcompress.tasks import evaluate_model

        result = evaluate_model(
            net,
            tokenizer,
            tasks=tasks,
            ppl_data=ppl_data,
            harness=harness,
            seqlen=seqlen,
            limit=limit,
            shots=shots,
            seed=seed,
            batch_size=batch_size,
            retrieval_lengths=retrieval_lengths,
            device=device,
            progress=progress,
        )
        sparsity, per_layer = measure_sparsity(net)
        recipe = read_recipe(model) if Path(str(model)).is_dir() else None
        return {"model": str(model), **result, "sparsity": sparsity, "layer_sparsity": per_layer, "recipe": recipe}
    text = load_text(ppl_data or "wikitext2", role="eval")
    if is_encoder(net.config):
        from lmcompress.encoder_eval import evaluate_encoder_folder

        enc = evaluate_encoder_folder(
            net,
            tokenizer,
            model,
            text.text,
            reference=reference,
            pooling=pooling,
            seqlen=seqlen,
            device=device,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle,
            progress=progress,
        )
        sparsity, per_layer = measure_sparsity(net)
        recipe = read_recipe(model) if Path(str(model)).is_dir() else None
        mlm = enc["mlm"] or {}
        return {
            "model": str(model),
            "data": text.description,
            "perplexity": mlm.get("perplexity"),
            **enc,
            "sparsity": sparsity,
            "layer_sparsity": per_layer,
            "recipe": recipe,
        }
    result = perplexity(net, eval_windows(tokenizer, text.text, seqlen), device=device, progress=progress)
    sparsity, per_layer = measure_sparsity(net)
    recipe = read_recipe(model) if Path(str(model)).is_dir() else None
    return {
        "model": str(model),
        "data": text.description,
        "perplexity": result.perplexity,
        "nll": result.nll,
        "tokens": result.tokens,
        "windows": result.windows,
        "seqlen": result.seqlen,
        "sparsity": sparsity,
        "layer_sparsity": per_layer,
        "recipe": recipe,
    }
