"""``lmcompress eval``."""

from __future__ import annotations

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import kv_options, options
from lmcompress.cli.app import app
from lmcompress.errors import UserError


def parse_lengths(text: str | None) -> list[int] | None:
    """``"256,512"`` → ``[256, 512]`` (retrieval context lengths in tokens)."""
    if not text:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(
            f"--retrieval-lengths takes comma-separated token counts such as 256,512; got {text!r}"
        ) from None


@app.command("eval")
def evaluate(
    ctx: typer.Context,
    model: str = typer.Argument(..., help="Model folder (dense or written by lmcompress) or hub id."),
    ppl_data: str = typer.Option(
        None,
        "--ppl-data",
        help="Text file, wikitext2, c4, ptb, hf:NAME[...] or bundled:wikitext2-test [default: wikitext2 "
        "when no --tasks].",
    ),
    tasks: str = typer.Option(
        None,
        "--tasks",
        help="Comma-separated: ppl:TEXT, mc:TASK, qa:TASK, qa (generated passage QA, offline), "
        "retrieval[:kv|:passage]. TASK is a JSONL file, "
        "bundled:mc-demo / bundled:qa-demo, or arc_easy, arc_challenge, hellaswag, piqa, boolq, openbookqa, "
        "triviaqa, nq_open, web_questions.",
    ),
    limit: int = typer.Option(None, "--limit", help="At most N examples per task (N windows for ppl)."),
    shots: int = typer.Option(0, "--shots", help="Solved examples in the prompt of qa tasks (and --harness)."),
    harness: str = typer.Option(
        None, "--harness", help="lm-evaluation-harness task names to run on the model (needs pip install lm-eval)."
    ),
    retrieval_lengths: str = typer.Option(
        None,
        "--retrieval-lengths",
        help="Prompt lengths in tokens of retrieval and bare qa, e.g. 256,512 [default: retrieval "
        "128..context, qa 512,1024].",
    ),
    batch_size: int = typer.Option(16, "--batch-size", help="Sequences per forward pass when scoring choices."),
    seed: int = typer.Option(0, "--seed", help="Seed for retrieval prompts and few-shot draws."),
    seqlen: int = options.SEQLEN,
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    offload: str = options.OFFLOAD_NONE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    quiet: bool = options.QUIET,
    reference: str = typer.Option(
        None,
        "--reference",
        help="Dense model to compare with: causal LMs get KL divergence, top-1 agreement and the change in the right "
        "token's probability on the perplexity windows; encoders get sentence-embedding similarity [encoders: "
        "default the recipe's source].",
    ),
    agreement: bool = typer.Option(
        False, "--agreement", help="Causal LMs: agreement with the recipe's source model (as --reference SOURCE)."
    ),
    bos: bool = typer.Option(
        None,
        "--bos/--no-bos",
        help="Start every perplexity window with the BOS token [default: where the tokenizer adds one, as LLaMA "
        "and Gemma do].",
    ),
    pooling: str = typer.Option(None, "--pooling", help="Encoders: sentence embedding pooling, mean | cls | pooler."),
    profile: bool = typer.Option(
        False,
        "--profile",
        help="Also report params, FLOPs/token, latency/token, prefill/decode tokens/s and peak memory (and the "
        "dense source's).",
    ),
    kernels: str = typer.Option(
        "auto",
        "--kernels",
        help="With --profile: run quantized layers from their codes (auto: lmcompress's AVX2 kernel, else "
        "PyTorch's; aten: PyTorch's int8/int4 ops) or dequantized (none).",
    ),
    kv_budget: str = kv_options.KV_BUDGET,
    kv_recent: float = kv_options.KV_RECENT,
    kv_bits: int = kv_options.KV_BITS,
    kv_group: int = kv_options.KV_GROUP,
    kv_key_grid: str = kv_options.KV_KEY_GRID,
    kv_key_tokens: int = kv_options.KV_KEY_TOKENS,
    kv_sinks: int = kv_options.KV_SINKS,
    kv_score: str = kv_options.KV_SCORE,
    kv_decay: float = kv_options.KV_DECAY,
    kv_pool: int = kv_options.KV_POOL,
    kv_value_norm: bool = kv_options.KV_VALUE_NORM,
    kv_chunk: int = typer.Option(
        1,
        "--kv-chunk",
        help="With --kv-budget: tokens per forward after the first budget tokens when perplexity is streamed "
        "through the evicting cache (1: every token sees the compressed cache of the tokens before it).",
    ),
) -> None:
    """Perplexity and measured sparsity of a model; with --tasks also multiple choice, factoid QA and retrieval.

    Loads any folder lmcompress wrote (dense, packed, quantized, resized or factorized) or a plain Hugging
    Face model. Perplexity is exp of the mean next-token loss over non-overlapping windows of --seqlen
    tokens (each window starts with BOS where the tokenizer wants one), with a 95% interval over windows;
    --reference (or --agreement) adds the KL divergence to the dense model's next-token distribution, top-1
    agreement and the change in the right token's probability, on the same windows. Multiple choice picks
    the answer with the highest log-likelihood; qa checks greedy answers
    against the references; retrieval asks for a value hidden in a long prompt; every score has a 95% interval
    over examples. Encoders get masked-LM perplexity and embedding similarity to a dense --reference.

    Examples:

        lmcompress eval opt-sgpt50 --ppl-data wikitext2 --reference facebook/opt-125m --json

        lmcompress eval opt-sgpt50 --tasks ppl:test.txt,mc:arc_easy,qa:triviaqa,retrieval --limit 200 --shots 5

        lmcompress eval smollm --tasks ppl:wikitext2,retrieval --kv-budget 0.2 --kv-bits 8 --profile  # kv_cache.md
    """
    from lmcompress.measure.encoder import format_encoder_result
    from lmcompress.measure.evaluate import evaluate_pretrained

    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    from lmcompress.streaming import refuse_streaming

    refuse_streaming("lmcompress eval", offload)
    if not profile:
        options.refuse(ctx, ("kernels",), "without --profile")
    from lmcompress.kernels.linear import check_mode
    from lmcompress.kv_cache import kv_settings

    check_mode(kernels)
    kv = kv_settings(
        kv_budget,
        kv_recent,
        kv_bits,
        kv_group,
        kv_chunk,
        kv_sinks,
        kv_score,
        kv_decay,
        kv_pool,
        kv_value_norm,
        key_grid=kv_key_grid,
        key_tokens=kv_key_tokens,
    )
    if kv is None:
        options.refuse(
            ctx,
            ("kv_recent", "kv_group", "kv_chunk", "kv_sinks", "kv_score", "kv_decay", "kv_pool", "kv_value_norm"),
            "without --kv-budget or --kv-bits 8|4",
        )
    elif not kv.evicts:
        options.refuse(
            ctx,
            ("kv_recent", "kv_chunk", "kv_sinks", "kv_score", "kv_decay", "kv_pool", "kv_value_norm"),
            "without --kv-budget",
        )
    if kv is not None and harness:
        raise UserError("--harness runs lm-evaluation-harness's own loop: the compressed KV cache does not apply")
    if tasks:
        from lmcompress.measure.tasks import parse_tasks

        specs = parse_tasks(tasks)  # a typo in --tasks is reported before the model is loaded
        if kv is not None and any(s.kind == "mc" for s in specs):
            raise UserError(
                "mc tasks score choices by one teacher-forced forward without a cache: the compressed KV cache does "
                "not apply; drop the mc tasks or the --kv-* options"
            )
        if not any(s.kind == "retrieval" or (s.kind == "qa" and s.source is None) for s in specs):
            options.refuse(ctx, ("retrieval_lengths",), "without a retrieval task or bare qa in --tasks")
    else:
        options.refuse(ctx, ("retrieval_lengths",), "without a retrieval task in --tasks")
    result = evaluate_pretrained(
        model,
        ppl_data or (None if (tasks or harness) else "wikitext2"),
        tasks=tasks,
        harness=harness,
        limit=limit,
        shots=shots,
        seed=seed,
        batch_size=batch_size,
        retrieval_lengths=parse_lengths(retrieval_lengths),
        seqlen=seqlen,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        allow_pickle=allow_pickle,
        progress=options.show_progress(quiet),
        reference=reference,
        pooling=pooling,
        agreement=agreement,
        bos=bos,
        kv=kv,
        kv_memory=profile,
    )
    if profile:
        from lmcompress.measure.profile import profile_pretrained

        result["profile"] = profile_pretrained(
            model, seqlen=seqlen or 256, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
            allow_pickle=allow_pickle, kernels=kernels, generation=True,
        )  # fmt: skip
        if "kv_cache" in result:
            result["profile"]["kv_cache"] = result["kv_cache"]
    if as_json:
        typer.echo(json_text(result))
    elif result.get("model_kind") == "encoder":
        typer.echo(format_encoder_result(result))
    else:
        typer.echo(format_result(str(model), result))
    if profile and not as_json:
        from lmcompress.measure.profile import format_profile

        typer.echo(format_profile(result["profile"]))
        if "kv_cache" in result:
            from lmcompress.kv_cache import format_memory

            typer.echo(format_memory(result["kv_cache"]))


def _ci(interval, digits: int = 4) -> str:
    return f"[{interval[0]:.{digits}f}, {interval[1]:.{digits}f}]" if interval else "(one window: no interval)"


def format_result(model: str, result: dict) -> str:
    """eval's text output for a causal LM: perplexity or task metrics with their 95% intervals, and agreement."""
    lines = []
    if "metrics" in result:
        lines.append(f"{model}: sparsity {result['sparsity']:.2%}; 95% intervals in brackets")
        intervals = result.get("intervals", {})
        for key, value in result["metrics"].items():
            better = "higher" if result["higher_is_better"][key] else "lower"
            ci = f"[{intervals[key][0]:.4f}, {intervals[key][1]:.4f}]" if key in intervals else ""
            lines.append(f"  {key:40s} {value:10.4f} {ci:>22s}  ({better} is better)")
    else:
        bos = ", each starting with BOS" if result.get("bos") else ""
        lines.append(
            f"{model}: perplexity {result['perplexity']:.3f} {_ci(result.get('perplexity_ci'), 3)} (95%) on "
            f"{result['tokens']} tokens ({result['windows']} windows of {result['seqlen']}{bos}), "
            f"sparsity {result['sparsity']:.2%}"
        )
        if result.get("agreement"):
            a = result["agreement"]
            lines.append(
                f"  against {result['reference']}: KL mean {a['kl_mean']:.5f} {_ci(a['kl_mean_ci'], 5)}, median "
                f"{a['kl_median']:.5f}, p99 {a['kl_p99']:.4f} nats/token; top-1 agreement "
                f"{a['top1_agreement']:.2%}; mean change in the right token's probability {a['delta_p_mean']:+.4f} "
                f"{_ci(a['delta_p_mean_ci'])}"
            )
    return "\n".join(lines)
