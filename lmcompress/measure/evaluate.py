"""The Python API behind the CLI: whole jobs from a model name to a saved, described result."""

from __future__ import annotations

import logging
from pathlib import Path

from lmcompress.calibration.data import embedding_rows, eval_windows, load_text, wants_bos
from lmcompress.checkpoint.folder import read_recipe
from lmcompress.checkpoint.load import load_model
from lmcompress.errors import UserError
from lmcompress.kv_cache import attach, memory_report
from lmcompress.measure.perplexity import perplexity
from lmcompress.models.families import context_length, is_encoder
from lmcompress.runtime import check_device, resolve_seqlen
from lmcompress.transforms.prune import measure_sparsity

log = logging.getLogger(__name__)


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
    agreement: bool = False,
    bos: bool | None = None,
    kv=None,
    kv_memory: bool = False,
) -> dict:
    """Perplexity of a model (dense or compressed) and the sparsity measured in its weights.

    ``tasks`` (``"ppl:FILE,mc:TASK,qa:TASK,retrieval"``) and ``harness`` (lm-evaluation-harness task names) add
    the evaluations of ``lmcompress.measure.tasks``; the result then also has ``tasks``, ``metrics`` and
    ``higher_is_better`` (see docs/evaluation.md), and the perplexity keys come from the first ``ppl`` task.

    Encoders (BERT-style) get MLM perplexity (if they have the head) and, against ``reference`` (or the
    recipe's local source model), sentence-embedding cosine similarity: see ``lmcompress.measure.encoder``.

    Causal LMs, with ``reference`` (or ``agreement``: against the recipe's source model, which must exist
    here), also get ``agreement`` with that dense model on the perplexity windows: see
    ``lmcompress.measure.agreement``. Windows start with BOS where the tokenizer wants it (``bos``: force it
    either way); the result says which (``bos``). Perplexity comes with its 95% interval (``perplexity_ci``).

    ``kv`` (``lmcompress.kv_cache.KVSettings``): perplexity and generation run through the compressed KV cache
    (docs/kv_cache.md); the result then has ``kv_cache`` (settings and bytes per token), as with ``kv_memory``.
    """
    check_device(device)
    net, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    ctx = context_length(net.config)
    if ctx is not None and ctx < 2:
        raise UserError(
            f"the model's context is {ctx} token: perplexity needs windows of at least 2 tokens (one to predict "
            "from, one predicted), so this model cannot be evaluated"
        )
    seqlen = resolve_seqlen(net, seqlen, minimum=2)
    encoder = is_encoder(net.config)
    if pooling is not None and not encoder:
        raise UserError("pooling applies to encoders (sentence embeddings); this model is a causal LM", param="pooling")
    if encoder and (agreement or bos is not None):
        raise UserError(
            "agreement and bos apply to causal LMs; an encoder is compared by sentence embeddings (reference)",
            param=("agreement", "bos"),
        )
    if kv is not None and (encoder or reference is not None or agreement):
        raise UserError(
            "the compressed KV cache (kv_*) applies to causal LMs and is not combined with agreement against a "
            "reference: evaluate it without reference / agreement",
            param=("kv_budget", "kv_bits"),
        )
    ref_net, ref_path = None, None
    if not encoder and (reference is not None or agreement):
        ref_net, ref_path = load_reference(model, reference, tokenizer, dtype, trust_remote_code, allow_pickle)
    if tasks or harness or limit is not None:  # lmcompress.measure.tasks; ppl_data, if given, is one more task
        if encoder:
            raise UserError(
                "tasks, harness and limit evaluate causal LMs; for encoders use ppl_data only",
                param=("tasks", "harness", "limit", "ppl_data"),
            )
        from lmcompress.measure.tasks import evaluate_model

        with attach(net, kv):
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
                reference_model=ref_net,
                bos=bos,
            )
    else:
        text = load_text(ppl_data or "wikitext2", role="eval")
        if encoder:
            from lmcompress.measure.encoder import evaluate_encoder_folder

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
            result = {"data": text.description, "perplexity": (enc["mlm"] or {}).get("perplexity"), **enc}
        else:
            with attach(net, kv):
                result = _perplexity_and_agreement(net, tokenizer, ref_net, text, seqlen, bos, device, progress)
    if not encoder and (kv is not None or kv_memory):
        try:
            result["kv_cache"] = memory_report(net.config, kv, next(net.parameters()).dtype)
        except UserError:  # a layout the compressed cache does not cover (sliding or linear attention)
            if kv is not None:
                raise
    if ref_path is not None:
        result["reference"] = ref_path
    # What every evaluation reports: the zeros measured in the weights, and the recipe of an lmcompress folder.
    sparsity, per_layer = measure_sparsity(net)
    recipe = read_recipe(model) if Path(str(model)).is_dir() else None
    return {"model": str(model), **result, "sparsity": sparsity, "layer_sparsity": per_layer, "recipe": recipe}


def _perplexity_and_agreement(net, tokenizer, ref_net, text, seqlen: int, bos, device: str, progress: bool) -> dict:
    """Perplexity (with its interval) on the windows of ``text`` and, with a reference, agreement on the same."""
    from lmcompress.measure.agreement import agreement

    bos = wants_bos(tokenizer) if bos is None else bos
    windows = eval_windows(tokenizer, text.text, seqlen, bos=bos, vocab_size=embedding_rows(net))
    ppl = perplexity(net, windows, device=device, progress=progress)
    result = {
        "data": text.description,
        "perplexity": ppl.perplexity,
        "perplexity_ci": list(ppl.perplexity_ci) if ppl.perplexity_ci else None,
        "nll": ppl.nll,
        "tokens": ppl.tokens,
        "windows": ppl.windows,
        "seqlen": ppl.seqlen,
        "bos": bos,
    }
    if ref_net is not None:
        result["agreement"] = agreement(net, ref_net, windows, device=device, progress=progress)
    return result


def load_reference(model, reference: str | None, tokenizer, dtype: str, trust_remote_code: bool, allow_pickle: bool):
    """The dense model to measure agreement against: ``reference``, else the recipe's source model (which must
    exist on this machine); ``(model, path)``. Its tokenizer must have the same vocabulary."""
    from lmcompress.measure.agreement import check_same_vocabulary
    from lmcompress.measure.encoder import reference_for

    path = reference_for(model, reference)
    if path is None:
        recipe = read_recipe(model) if Path(str(model)).is_dir() else None
        source = (recipe or {}).get("source_model")
        where = f"its recipe names {source}, which is not a model folder here" if source else "it has no recipe"
        raise UserError(
            f"agreement needs the dense model {model} came from, and {where}; give it with --reference DENSE_MODEL",
            param="reference",
        )
    ref_net, ref_tokenizer = load_model(
        path, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    if is_encoder(ref_net.config):
        raise UserError(f"reference {path} is an encoder; give the causal LM the model was compressed from")
    check_same_vocabulary(tokenizer, ref_tokenizer)
    return ref_net, str(path)
