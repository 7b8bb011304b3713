"""``lmcompress generate``."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from lmcompress.checkpoint.folder import json_text
from lmcompress.cli import kv_options, options
from lmcompress.cli.app import app
from lmcompress.errors import UserError

if TYPE_CHECKING:
    import torch


class _Clock:
    """A logits processor that only notes when each step's logits arrive: the first call ends the prefill."""

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        self.wall.append(time.perf_counter())
        self.cpu.append(time.process_time())
        return scores


def encode_prompt(tokenizer, prompt: str, chat: bool) -> torch.Tensor:
    """The token ids ``[1, n]`` of ``prompt`` (wrapped in the tokenizer's chat template with ``chat``). A prompt
    that is not valid UTF-8, or a chat template that fails (jinja's sandbox refuses what could run code), is a
    :class:`UserError`."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise UserError("the prompt is not valid UTF-8 text; give it as UTF-8", param="prompt") from None
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise UserError("this tokenizer defines no chat_template; give the prompt without chat", param="chat")
        try:
            ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, return_tensors="pt", return_dict=True
            )["input_ids"]
        except Exception as exc:  # jinja2 TemplateError / SecurityError, or a template rendering nonsense
            raise UserError(
                f"the tokenizer's chat_template cannot be applied ({type(exc).__name__}: {exc}); fix it "
                "(tokenizer_config.json) or give the prompt without chat",
                param="chat",
            ) from None
    else:
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UserError("the prompt is empty after tokenization: give some text", param="prompt")
    return ids


def check_context(config, prompt_tokens: int, max_new_tokens: int) -> None:
    """Refuse a prompt that, with the tokens to generate, does not fit in the model's context: the positions
    past it were never trained (transformers would only warn)."""
    from lmcompress.models.families import context_length

    context = context_length(config)
    if context and prompt_tokens + max_new_tokens > context:
        raise UserError(
            f"the prompt is {prompt_tokens} tokens; with {max_new_tokens} new tokens that exceeds the model's context "
            f"of {context}: shorten the prompt or lower max_new_tokens",
            param=("prompt", "max_new_tokens"),
        )


def generate_text(
    model,
    tokenizer,
    prompt: str,
    *,
    max_new_tokens: int = 32,
    sample: bool = False,
    temperature: float = 1.0,
    seed: int = 0,
    chat: bool = False,
    device: str = "cpu",
    kv=None,
) -> dict:
    """Generate from ``prompt`` with ``transformers``' ``generate`` (batch 1); returns the text, the new token ids
    and prefill / decode tokens per second (wall and CPU time). Prefill ends when the first logits arrive;
    decode is every later step (``new − 1`` tokens). ``kv`` (``lmcompress.kv_cache.KVSettings``): through the
    compressed KV cache (a fractional budget is taken of the prompt's tokens)."""
    import torch
    from transformers import LogitsProcessorList

    from lmcompress.kv_cache import attach, memory_report

    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens must be positive, got {max_new_tokens}", param="max_new_tokens")
    if sample and not temperature > 0:
        raise UserError(f"temperature must be positive, got {temperature}", param="temperature")
    ids = encode_prompt(tokenizer, prompt, chat)
    check_context(model.config, int(ids.shape[1]), max_new_tokens)
    ids = ids.to(device)
    clock = _Clock()
    kwargs = {"do_sample": True, "temperature": temperature} if sample else {"do_sample": False}
    if not sample:
        kwargs.update(temperature=None, top_p=None, top_k=None)  # silence sampling defaults of the generation config
    torch.manual_seed(seed)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    t0, c0 = time.perf_counter(), time.process_time()
    with torch.inference_mode(), attach(model, kv):
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            logits_processor=LogitsProcessorList([clock]),
            pad_token_id=pad,
            **kwargs,
        )
    t1, c1 = time.perf_counter(), time.process_time()
    new = out[0, ids.shape[1] :]
    result = {
        "text": tokenizer.decode(new, skip_special_tokens=True),
        "prompt_tokens": int(ids.shape[1]),
        "new_tokens": int(new.numel()),
        "token_ids": new.tolist(),
        "prefill_tokens_per_s": None,
        "decode_tokens_per_s": None,
        "prefill_tokens_per_s_cpu": None,
        "decode_tokens_per_s_cpu": None,
    }
    if kv is not None:
        result["kv_cache"] = memory_report(model.config, kv, next(model.parameters()).dtype)
    if clock.wall:
        result["prefill_tokens_per_s"] = ids.shape[1] / max(clock.wall[0] - t0, 1e-9)
        result["prefill_tokens_per_s_cpu"] = ids.shape[1] / max(clock.cpu[0] - c0, 1e-9)
        if new.numel() > 1:
            result["decode_tokens_per_s"] = (new.numel() - 1) / max(t1 - clock.wall[0], 1e-9)
            result["decode_tokens_per_s_cpu"] = (new.numel() - 1) / max(c1 - clock.cpu[0], 1e-9)
    return result


@app.command()
def generate(
    model: str = typer.Argument(..., help="Model folder (packed, quantized, or any folder lmcompress loads)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="Text to continue."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Tokens to generate."),
    kernels: str = typer.Option(
        "auto",
        "--kernels",
        help="auto: quantized layers run from their codes (lmcompress's AVX2 kernel, else PyTorch's int8/int4 "
        "ops); aten: PyTorch's ops only; none: dequantized.",
    ),
    greedy: bool = typer.Option(True, "--greedy/--sample", help="Greedy decoding, or sample with --temperature."),
    temperature: float = typer.Option(1.0, "--temperature", help="Sampling temperature (with --sample)."),
    seed: int = typer.Option(0, "--seed", min=0, max=2**32 - 1, help="Seed for sampling."),
    chat: bool = typer.Option(False, "--chat", help="Wrap the prompt in the tokenizer's chat template."),
    device: str = options.DEVICE,
    dtype: str = options.DTYPE,
    threads: int = typer.Option(None, "--threads", help="Torch CPU threads [default: torch's choice]."),
    trust_remote_code: bool = options.TRUST,
    allow_pickle: bool = options.PICKLE,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
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
) -> None:
    """Generate text from a model and print it with its prefill and decode speed (tokens/s, batch 1).

    With --kernels auto (the default) the quantized layers of a packed folder run from their integer codes:
    on x86-64 with AVX2 by lmcompress's own kernel (built once at first use, float32 compute, any bit width
    and any group size that is a multiple of 32), elsewhere on PyTorch's CPU weight-only ops (int8 per-channel,
    int4 grouped, bfloat16 compute; --kernels aten asks for these); the layers no kernel runs exactly stay
    dequantized, and the first line says which (docs/kernels.md).

    Examples:

        lmcompress generate smollm-rtn4 --prompt "The capital of France is" --max-new-tokens 32

        lmcompress generate smollm-rtn4 --prompt "Write a haiku" --chat --sample --temperature 0.7 --seed 1

        lmcompress generate smollm --prompt "..." --kv-budget 0.2 --kv-bits 8   # compressed KV cache, docs/kv_cache.md
    """
    import torch

    from lmcompress.checkpoint.load import load
    from lmcompress.jobs import check_device
    from lmcompress.kernels.linear import check_mode, kernel_report
    from lmcompress.kv_cache import format_memory, kv_settings
    from lmcompress.measure.speed import check_threads

    check_mode(kernels)
    check_device(device)
    kv = kv_settings(
        kv_budget,
        kv_recent,
        kv_bits,
        kv_group,
        sinks=kv_sinks,
        score=kv_score,
        decay=kv_decay,
        pool=kv_pool,
        value_norm=kv_value_norm,
        key_grid=kv_key_grid,
        key_tokens=kv_key_tokens,
    )
    if check_threads(threads) is not None:
        torch.set_num_threads(threads)
    net, tokenizer = load(
        model, dtype=dtype, device=device, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
        kernels=kernels,
    )  # fmt: skip
    report = kernel_report(net)
    result = generate_text(
        net, tokenizer, prompt, max_new_tokens=max_new_tokens, sample=not greedy, temperature=temperature,
        seed=seed, chat=chat, device=device, kv=kv,
    )  # fmt: skip
    result["kernels"] = report.to_dict() if report else None
    result["torch_threads"] = torch.get_num_threads()
    if as_json:
        typer.echo(json_text(result))
        return
    if report is not None:
        typer.echo(report.summary(), err=True)
    if kv is not None:
        typer.echo(format_memory(result["kv_cache"]), err=True)
    typer.echo(result["text"])

    def speed(key: str) -> str:
        wall, cpu = result[key], result[f"{key}_cpu"]
        return "-" if wall is None else f"{wall:.1f} tokens/s (CPU time {cpu:.1f})"

    typer.echo(
        f"prefill {result['prompt_tokens']} tokens: {speed('prefill_tokens_per_s')}; decode "
        f"{result['new_tokens']} tokens: {speed('decode_tokens_per_s')}; {result['torch_threads']} threads",
        err=True,
    )
