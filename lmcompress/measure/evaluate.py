"""The Python API behind the CLI: whole jobs from a model name to a saved, described result."""

from __future__ import annotations

import logging
from pathlib import Path

from lmcompress.calibration.data import eval_windows, load_text
from lmcompress.checkpoint.folder import read_recipe
from lmcompress.checkpoint.load import load_model
from lmcompress.errors import UserError
from lmcompress.jobs import check_device, resolve_seqlen
from lmcompress.measure.perplexity import perplexity
from lmcompress.models.families import is_encoder
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
) -> dict:
    """Perplexity of a model (dense or compressed) and the sparsity measured in its weights.

    ``tasks`` (``"ppl:FILE,mc:TASK,qa:TASK,retrieval"``) and ``harness`` (lm-evaluation-harness task names) add
    the evaluations of ``lmcompress.measure.tasks``; the result then also has ``tasks``, ``metrics`` and
    ``higher_is_better`` (see docs/evaluation.md), and the perplexity keys come from the first ``ppl`` task.

    Encoders (BERT-style) get MLM perplexity (if they have the head) and, against ``reference`` (or the
    recipe's local source model), sentence-embedding cosine similarity: see ``lmcompress.measure.encoder``.
    """
    check_device(device)
    net, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    seqlen = resolve_seqlen(net, seqlen, minimum=2)
    if tasks or harness or limit is not None:  # lmcompress.measure.tasks; ppl_data, if given, is one more task
        if is_encoder(net.config):
            raise UserError(
                "tasks, harness and limit evaluate causal LMs; for encoders use ppl_data only",
                param=("tasks", "harness", "limit", "ppl_data"),
            )
        from lmcompress.measure.tasks import evaluate_model

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
    else:
        text = load_text(ppl_data or "wikitext2", role="eval")
        if is_encoder(net.config):
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
            ppl = perplexity(net, eval_windows(tokenizer, text.text, seqlen), device=device, progress=progress)
            result = {
                "data": text.description,
                "perplexity": ppl.perplexity,
                "nll": ppl.nll,
                "tokens": ppl.tokens,
                "windows": ppl.windows,
                "seqlen": ppl.seqlen,
            }
    # What every evaluation reports: the zeros measured in the weights, and the recipe of an lmcompress folder.
    sparsity, per_layer = measure_sparsity(net)
    recipe = read_recipe(model) if Path(str(model)).is_dir() else None
    return {"model": str(model), **result, "sparsity": sparsity, "layer_sparsity": per_layer, "recipe": recipe}
