"""Export to GGUF, the file format of llama.cpp, written with the ``gguf`` package's ``GGUFWriter``.

Every tensor gets llama.cpp's name (``gguf.TensorNameMap``; the family table is
:mod:`lmcompress.models.gguf_names`), the architecture and tokenizer metadata llama.cpp reads, and one of
the block types below. A block is 32 consecutive inputs of one output row with one fp16 scale ``d``:

* ``Q4_0``: ``w = d·(q − 8)``, ``q ∈ 0..15``; ``Q4_1``: ``w = d·q + m``, ``q ∈ 0..15``, fp16 ``m``;
  ``Q5_0``: ``w = d·(q − 16)``, ``Q5_1``: ``w = d·q + m``, ``q ∈ 0..31`` (the fifth bits of a block's 32 codes
  in one 32-bit word); ``Q8_0``: ``w = d·q``, ``q ∈ −128..127`` (int8);
* the K-quants ``Q2_K`` … ``Q6_K`` (:mod:`lmcompress.algorithms.kquants`): super-blocks of 256 inputs with
  integer sub-block scales under fp16 ``d`` / ``dmin``.

Weights that ``lmcompress quantize`` stored as integer codes (``w = s·(q − z)``, see
:mod:`lmcompress.algorithms.quant`) are written *from their codes* when the grid is one of these:

* 4-bit symmetric: ``z = 8`` always and ``q ∈ 0..15``, so ``w = s·(q − 8)`` is ``Q4_0`` with ``d = fp16(s)``
  (on the ``q4_0`` grid ``s`` already is an fp16 value, so nothing at all is rounded: with groups of 32 the
  blocks are the ones llama.cpp's own quantizer writes);
* 4-bit asymmetric: ``w = s·q − s·z`` is ``Q4_1`` with ``d = fp16(s)``, ``m = fp16(−d·z)``; 5-bit symmetric
  (``z = 16``) and asymmetric likewise ``Q5_0`` and ``Q5_1`` (the ``q4_1`` / ``q5_0`` / ``q5_1`` grids: fp16
  scales and minimums, llama.cpp's own rounding, so nothing is rounded);
* 8-bit symmetric: ``z = 128``, so ``w = s·(q − 128)`` is ``Q8_0`` with the int8 ``q − 128`` and ``d = fp16(s)``;
* a K-quant grid (``quantize --grid q2_k … q6_k``): its codes, fp16 ``d`` / ``dmin`` and integer sub-block scales
  are the block's bytes, nothing rounded;

provided each group is a run of consecutive inputs whose length is a multiple of 32 (a group of 64 or 128, or
a whole row, is written as 2, 4, ... blocks with the same scale; act-order ``g_idx`` groups are not runs). The
codes are copied unchanged; the only change is rounding each scale (and ``Q4_1``'s minimum) to fp16.

A mix (``q2_k``, ``q3_k_m``, ``q4_k_m``, ``q5_k_m``, ``q6_k``, ``q4_0_mix``, ``q5_0_mix``:
:mod:`lmcompress.models.gguf_mixes`) gives each tensor llama.cpp's type for it; a model quantized with
``--gguf-mix`` of the same mix is written entirely from its codes (its untied token embedding, which lmcompress
does not quantize, is re-quantized).

Anything else (other grids, dense weights) is re-quantized with round-to-nearest into the block type asked for
(``gguf.quants.quantize``: llama.cpp's reference quantizers), or written as f16 / bf16 / f32, and the export
reports the relative Frobenius error ``‖W_gguf − W‖ / ‖W‖`` it added per tensor (``W`` the weight lmcompress
holds); K-quants are re-quantized with lmcompress's own K-quant RTN (:mod:`lmcompress.algorithms.kquants`, no
importance matrix). Exact zeros (pruned weights) stay zeros in ``Q4_0``, ``Q5_0``, ``Q8_0`` and the float types;
``Q4_1`` / ``Q5_1`` keep them only up to their fp16 minimum (``d·z + m`` is the fp16 rounding of ``d·z``, not 0).

llama.cpp's ``llama`` architecture pairs rotary dimensions differently from Hugging Face, so ``q_proj`` /
``k_proj`` rows are reordered within each head (codes, scales and zero points together): see
:func:`lmcompress.models.gguf_names.rotary_row_order`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from lmcompress.algorithms.kquants import KTYPES, QK_K, rtn_kquant
from lmcompress.algorithms.kquants import pack as pack_kquant
from lmcompress.algorithms.quant import QuantizedTensor, kquant_grid_of
from lmcompress.checkpoint.checks import check_finite_state, expand, path_exists
from lmcompress.checkpoint.folder import check_not_nested, check_writable, read_recipe, write_path_atomic
from lmcompress.errors import UserError
from lmcompress.models.gguf_mixes import MIXES, mix_types
from lmcompress.models.gguf_names import (
    arch_name,
    gguf_family,
    pre_tokenizer_name,
    rotary_row_order,
    rotary_rows,
    tensor_name_map,
)

log = logging.getLogger(__name__)

TYPES = ("auto", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *KTYPES, *MIXES, "f16", "bf16", "f32")
EMBED_TYPES = ("auto", "q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *KTYPES, "f16", "bf16", "f32")
BLOCK = 32  # inputs per block of Q4_0 / Q4_1 / Q5_0 / Q5_1 / Q8_0
_BLOCK_TYPES = ("q4_0", "q4_1", "q5_0", "q5_1", "q8_0", *KTYPES)
_EMBEDDINGS = ("token_embd.weight", "output.weight")


def _gguf():
    try:
        import gguf
    except ImportError:
        raise UserError("export --format gguf needs the gguf package: pip install gguf") from None
    return gguf


def _ggml_type(name: str):
    return getattr(_gguf().GGMLQuantizationType, name.upper())


# ----------------------------------------------------------------------------------------------------------
# which lmcompress grids are GGUF block types


def _default_groups(q: QuantizedTensor) -> bool:
    cols = q.codes.shape[1]
    return q.g_idx is None or torch.equal(q.g_idx.long().cpu(), torch.arange(cols) // q.spec.width(cols))


def exact_block_type(q: QuantizedTensor) -> tuple[str | None, str]:
    """``(type, "")`` when ``q``'s codes are that GGUF block type (q4_0, q4_1, q5_0, q5_1, q8_0, q2_k … q6_k) as
    they are, else ``(None, why not)``."""
    spec, cols = q.spec, q.codes.shape[1]
    if not _default_groups(q):
        return None, "act-order groups (g_idx): a group is not a run of consecutive inputs"
    if spec.grid in KTYPES:
        return (spec.grid, "") if cols % QK_K == 0 else (None, f"{cols} inputs are not whole 256-input super-blocks")
    if cols % BLOCK:
        return None, f"{cols} inputs are not a multiple of the 32-input GGUF block"
    width = spec.width(cols)
    if width % BLOCK:
        return None, f"group size {width} is not a multiple of 32"
    zero = q.zero
    if spec.bits == 4 and spec.sym and bool((zero == 8).all()):
        return "q4_0", ""
    if (
        spec.bits == 4
        and not spec.sym
        and (spec.grid == "q4_1" or bool(((zero >= 0) & (zero <= 15) & (zero == zero.round())).all()))
    ):
        return "q4_1", ""
    if spec.bits == 5 and spec.sym and bool((zero == 16).all()):
        return "q5_0", ""
    if spec.bits == 5 and not spec.sym and (spec.grid == "q5_1" or bool((zero == zero.round()).all())):
        return "q5_1", ""
    if spec.bits == 8 and spec.sym and bool((zero == 128).all()):
        return "q8_0", ""
    kind = "symmetric" if spec.sym else "asymmetric"
    return None, (
        f"a {spec.bits}-bit {kind} grid has no GGUF block type (Q4_0 / Q5_0: 4 / 5-bit symmetric, Q4_1 / Q5_1: "
        "4 / 5-bit asymmetric, Q8_0: 8-bit symmetric)"
    )


def _block_params(q: QuantizedTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale and zero point of every 32-input block, ``[rows, cols / 32]`` each."""
    cols = q.codes.shape[1]
    group = (torch.arange(cols // BLOCK) * BLOCK) // q.spec.width(cols)
    return q.scale.float()[:, group], q.zero.float()[:, group]


def _fp16_bytes(x: torch.Tensor) -> np.ndarray:
    """``x`` ([rows, blocks]) rounded to fp16, as ``[rows, blocks, 2]`` little-endian bytes."""
    half = x.numpy().astype(np.float16)
    if not np.isfinite(half).all():
        raise UserError("a quantization scale does not fit in fp16 (GGUF stores block scales as fp16)")
    return half.astype("<f2").view(np.uint8).reshape(*x.shape, 2)


def _nibbles(codes: torch.Tensor) -> np.ndarray:
    """4-bit codes ``[rows, blocks, 32]`` as GGUF packs them: byte ``j`` holds ``q[j]`` (low) and ``q[j+16]``."""
    c = codes.numpy().astype(np.uint8)
    return c[..., :16] | (c[..., 16:] << np.uint8(4))


def _fifth_bits(codes: torch.Tensor) -> np.ndarray:
    """Q5_0 / Q5_1's ``qh``: bit ``j`` of a little-endian uint32 is bit 4 of code ``j`` of the block."""
    high = (codes.to(torch.int64) >> 4) & 1
    word = (high << torch.arange(BLOCK, dtype=torch.int64)).sum(-1).numpy().astype("<u4")
    return word.view(np.uint8).reshape(*codes.shape[:-1], 4)


def pack_codes(q: QuantizedTensor, block_type: str) -> np.ndarray:
    """The raw GGUF bytes ``[rows, cols/32 · block bytes]`` of ``q`` in ``block_type``, from its own codes (the
    grid must be that type: :func:`exact_block_type`)."""
    if block_type in KTYPES:
        return pack_kquant(q.codes.cpu(), kquant_grid_of(q.to("cpu")))
    rows, cols = q.codes.shape
    blocks = cols // BLOCK
    scale, zero = _block_params(q)
    codes = q.codes.reshape(rows, blocks, BLOCK)
    d = _fp16_bytes(scale)
    if block_type == "q4_0":
        parts = [d, _nibbles(codes)]
    elif block_type in ("q4_1", "q5_1"):
        d16 = torch.from_numpy(scale.numpy().astype(np.float16).astype(np.float32))
        parts = [d, _fp16_bytes(0.0 - d16 * zero)]  # 0 − x: +0.0, not −0.0, where d = 0 (as llama.cpp)
        parts += [_fifth_bits(codes), _nibbles(codes & 15)] if block_type == "q5_1" else [_nibbles(codes)]
    elif block_type == "q5_0":
        parts = [d, _fifth_bits(codes), _nibbles(codes & 15)]
    elif block_type == "q8_0":
        parts = [d, (codes.to(torch.int16) - 128).to(torch.int8).numpy().view(np.uint8)]
    else:
        raise ValueError(f"no packing for {block_type}")
    return np.concatenate(parts, axis=-1).reshape(rows, -1)


# ----------------------------------------------------------------------------------------------------------
# one tensor


@dataclass
class _Tensor:
    name: str  # GGUF name
    data: np.ndarray  # what GGUFWriter writes (uint8 bytes for block types and bf16)
    type: str  # q4_0, f16, ...
    source: str  # "codes" (exact), "requantized", "float" (cast), "vector"
    rel_error: float | None = None
    zeros: int = 0
    zeros_kept: int = 0


def _float_data(x: torch.Tensor, kind: str) -> np.ndarray:
    a = x.float().numpy()
    if kind == "f32":
        return a
    if kind == "f16":
        if np.abs(a).max(initial=0.0) > 65504:
            raise UserError("a weight exceeds the fp16 range: export with type bf16 or f32", param="qtype")
        return a.astype(np.float16)
    return _gguf().quants.quantize(a, _ggml_type("bf16"))  # bf16 bytes, round-to-nearest-even


def _encode(name: str, ref: torch.Tensor, q: QuantizedTensor | None, kind: str) -> _Tensor:
    """``ref`` (the float32 weight) as GGUF type ``kind``: from ``q``'s codes when they are that type."""
    gguf = _gguf()
    if q is not None and exact_block_type(q)[0] == kind:
        data, source = pack_codes(q, kind), "codes"
        data = data.reshape(*ref.shape[:-1], -1)  # fused experts: [E, rows, bytes]
    elif kind in KTYPES:
        if ref.shape[-1] % QK_K:
            raise UserError(
                f"{name} has {ref.shape[-1]} inputs, not a multiple of 256: it cannot be stored as {kind.upper()} "
                f"(llama.cpp falls back to {KTYPES[kind].fallback.upper()}); export with type q4_0, q8_0 or f16",
                param="qtype",
            )
        codes, grid = rtn_kquant(ref.float().reshape(-1, ref.shape[-1]), kind)
        data, source = pack_kquant(codes, grid).reshape(*ref.shape[:-1], -1), "requantized"
    elif kind in _BLOCK_TYPES:
        if ref.shape[-1] % BLOCK:
            raise UserError(
                f"{name} has {ref.shape[-1]} inputs, not a multiple of 32: it cannot be stored as {kind.upper()}; "
                "export with type f16",
                param="qtype",
            )
        data, source = gguf.quants.quantize(ref.float().numpy(), _ggml_type(kind)), "requantized"
    else:
        data, source = _float_data(ref, kind), "float" if ref.dim() >= 2 else "vector"
    back = data.astype(np.float32) if data.dtype != np.uint8 else gguf.quants.dequantize(data, _ggml_type(kind))
    want = ref.float().numpy()
    norm = float(np.linalg.norm(want))
    err = float(np.linalg.norm(back.reshape(want.shape) - want)) / norm if norm else 0.0
    zero = want == 0
    return _Tensor(name, data, kind, source, err, int(zero.sum()), int((zero & (back.reshape(want.shape) == 0)).sum()))


# ----------------------------------------------------------------------------------------------------------
# checks and metadata


def _check_output(output: str | Path, overwrite: bool, source: str | Path) -> Path:
    out = expand(output)
    if out.suffix.lower() != ".gguf":
        raise UserError(f"GGUF output {out} must be a file name ending in .gguf", param="output")
    check_not_nested(out, source)
    exists = path_exists(out)
    if out.is_dir():
        raise UserError(f"output {out} is a folder; give the path of the .gguf file to write", param="output")
    if exists and not overwrite:
        raise UserError(
            f"output file {out} already exists; choose another output or pass overwrite", param=("output", "overwrite")
        )
    if not out.parent.is_dir():
        raise UserError(f"the folder of output ({out.parent}) does not exist", param="output")
    check_writable(out.parent, out.name)
    return out


def _rope(config) -> tuple[float, str, float | None]:
    """``(theta, scaling type, factor)`` of ``config``; UserError for a rope llama.cpp's graph would not match."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    rope_type = params.get("rope_type", params.get("type", "default")) or "default"
    theta = params.get("rope_theta", getattr(config, "rope_theta", None)) or 10000.0
    if rope_type not in ("default", "linear"):
        raise UserError(
            f"the model uses {rope_type!r} rotary scaling; the GGUF export writes plain and linear rope only"
        )
    if (getattr(config, "partial_rotary_factor", None) or 1.0) != 1.0:
        raise UserError("the model rotates only part of each head (partial_rotary_factor): not exported to GGUF")
    return float(theta), rope_type, params.get("factor") if rope_type == "linear" else None


def _check_config(config, warnings: list[str]) -> None:
    if getattr(config, "use_sliding_window", False):
        raise UserError("the model uses sliding-window attention, which llama.cpp's graph for it does not apply")
    window = getattr(config, "sliding_window", None)
    ctx = getattr(config, "max_position_embeddings", None)
    if window and ctx and window < ctx:
        warnings.append(
            f"sliding window {window} < context {ctx}: llama.cpp attends to the whole context, so outputs differ "
            f"beyond {window} tokens"
        )


def _add_model_metadata(w, config, n_vocab: int, name: str, file_type: int, quantized: bool) -> None:
    gguf = _gguf()
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
    theta, rope_type, factor = _rope(config)
    w.add_name(name)
    w.add_quantized_by("lmcompress")
    w.add_context_length(int(config.max_position_embeddings))
    w.add_embedding_length(int(config.hidden_size))
    w.add_block_count(int(config.num_hidden_layers))
    w.add_feed_forward_length(int(config.intermediate_size))
    w.add_head_count(heads)
    w.add_head_count_kv(int(getattr(config, "num_key_value_heads", None) or heads))
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(theta)
    if rope_type == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(float(factor))
    w.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    experts = getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None)
    if experts:  # mixture of experts: routed experts' count, top-k and width (and the shared expert's)
        w.add_expert_count(int(experts))
        w.add_expert_used_count(int(config.num_experts_per_tok))
        if getattr(config, "moe_intermediate_size", None):
            w.add_expert_feed_forward_length(int(config.moe_intermediate_size))
        if getattr(config, "shared_expert_intermediate_size", None):
            w.add_expert_shared_feed_forward_length(int(config.shared_expert_intermediate_size))
    w.add_vocab_size(n_vocab)
    w.add_file_type(file_type)
    if quantized:
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _merges(model: dict) -> list[str]:
    out = []
    for merge in model.get("merges") or []:
        pair = merge.split(" ") if isinstance(merge, str) else list(merge)
        if len(pair) != 2 or any(" " in p for p in pair):
            raise UserError(f"the tokenizer has a merge {merge!r} that GGUF's 'a b' merge list cannot spell")
        out.append(f"{pair[0]} {pair[1]}")
    return out


def _special_flags(tokenizer) -> tuple[bool, bool]:
    """Whether encoding adds the BOS / EOS token (compared with ``add_special_tokens=False``)."""
    probe = "Hello world"
    with_special = list(tokenizer(probe)["input_ids"])
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    n = len(plain)
    if with_special == plain:
        return False, False
    for start in range(0, len(with_special) - n + 1):
        if with_special[start : start + n] == plain:
            head, tail = with_special[:start], with_special[start + n :]
            if head in ([], [bos]) and tail in ([], [eos]):
                return bool(head), bool(tail)
    raise UserError(
        f"the tokenizer adds special tokens GGUF cannot describe ({with_special} around {plain}): only a leading "
        "BOS and a trailing EOS are supported"
    )


def _add_tokenizer(w, tokenizer, config, n_vocab: int) -> dict:
    gguf = _gguf()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise UserError("the model has no fast (tokenizer.json) tokenizer: GGUF export needs one")
    data = json.loads(backend.to_str())
    model = data.get("model") or {}
    pre = pre_tokenizer_name(data.get("pre_tokenizer"))
    byte_level = (data.get("decoder") or {}).get("type") == "ByteLevel"
    if model.get("type") != "BPE" or not byte_level:
        raise UserError(
            f"the tokenizer is a {model.get('type')} model{'' if byte_level else ' without byte-level decoding'}; "
            "GGUF export writes byte-level BPE tokenizers (GPT-2 style: SmolLM, Qwen, LLaMA 3) only"
        )
    normalizer = data.get("normalizer")
    if normalizer is not None and normalizer.get("type") != "NFC":
        raise UserError(f"the tokenizer normalizes text ({normalizer.get('type')}), which llama.cpp would not do")
    if pre is None:
        raise UserError(
            "the tokenizer's pre-tokenizer matches none llama.cpp names (models/gguf_names.py PRE_TOKENIZERS): "
            f"{json.dumps(data.get('pre_tokenizer'))[:300]}"
        )
    vocab = tokenizer.get_vocab()
    if max(vocab.values(), default=-1) >= n_vocab:
        raise UserError(f"the tokenizer has ids beyond the model's {n_vocab} embedding rows")
    by_id = {i: t for t, i in vocab.items()}
    added = {int(i): t for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items()}
    T = gguf.TokenType
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(T.CONTROL if added[i].special else T.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(_merges(model))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else getattr(config, "pad_token_id", None)
    ids = {"bos": tokenizer.bos_token_id, "eos": tokenizer.eos_token_id, "unk": tokenizer.unk_token_id, "pad": pad}
    for kind, token_id in ids.items():
        if isinstance(token_id, int) and 0 <= token_id < n_vocab:
            getattr(w, f"add_{kind}_token_id")(token_id)
    add_bos, add_eos = _special_flags(tokenizer)
    w.add_add_bos_token(add_bos)
    w.add_add_eos_token(add_eos)
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):
        template = [{"name": k, "template": v} for k, v in template.items()]
    if template:
        w.add_chat_template(template)
    return {"pre": pre, "tokens": n_vocab, "merges": len(model.get("merges") or []), "add_bos": add_bos}


@contextlib.contextmanager
def _quiet_gguf():
    logger = logging.getLogger("gguf")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


# ----------------------------------------------------------------------------------------------------------
# the export


def _read_source(
    source: str | Path, recipe: dict | None, *, trust_remote_code: bool = False, allow_pickle: bool = False
):
    """``(config, tokenizer, state, quantized)``: float32 tensors by HF name and the exact codes of quantized ones."""
    from transformers import AutoTokenizer

    from lmcompress.checkpoint.load import load, load_config, resolve_source, tokenizer_error

    path = Path(str(source)).expanduser()
    if recipe and recipe.get("storage") == "packed":
        from lmcompress.checkpoint.packed import read_packed, strip_marker

        config = load_config(str(path), trust_remote_code)
        strip_marker(config)
        gguf_family(config)  # refuse before reading the weights
        state, quantized = read_packed(path, recipe)
        check_finite_state(state, path)
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except Exception as exc:
            raise tokenizer_error(path, exc) from None
        return config, tokenizer, {k: v.float() for k, v in state.items()}, quantized
    config = load_config(resolve_source(source, allow_pickle), trust_remote_code)
    gguf_family(config)
    model, tokenizer = load(source, dtype="float32", trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    return model.config, tokenizer, {k: v.detach().float() for k, v in model.state_dict().items()}, {}


_ROUTERS = ("ffn_gate_inp.weight", "ffn_gate_inp_shexp.weight")  # MoE routers (and the shared expert's gate)


def _expert_matrices(state: dict[str, torch.Tensor], quantized: dict[str, QuantizedTensor]):
    """``(hf_name, tensor, codes or None)`` of every tensor to write, fused routed experts as llama.cpp stores
    them: ``experts.gate_up_proj`` ``[E, 2I, H]`` split into ``experts.gate_proj`` and ``experts.up_proj``
    ``[E, I, H]`` (``*_exps``), their stacked codes ``[E·2I, H]`` split row for row the same way."""
    for hf_name, ref in state.items():
        q = quantized.get(hf_name)
        if ref.dim() != 3 or not hf_name.endswith("experts.gate_up_proj"):
            yield hf_name, ref, q
            continue
        e, two_i, _ = ref.shape
        half = two_i // 2
        base = hf_name.removesuffix("gate_up_proj")
        for k, part in enumerate(("gate_proj", "up_proj")):
            rows = (torch.arange(e).view(e, 1) * two_i + k * half + torch.arange(half).view(1, half)).reshape(-1)
            part_q = None if q is None else QuantizedTensor(q.codes[rows], q.scale[rows], q.zero[rows], q.spec, q.g_idx)
            yield base + part, ref[:, k * half : (k + 1) * half], part_q


def export_gguf(
    source: str | Path,
    output: str | Path,
    *,
    qtype: str = "auto",
    embed_type: str = "auto",
    overwrite: bool = False,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> dict:
    """Write ``source`` (an lmcompress folder, a plain folder or a hub id) as the GGUF file ``output``.

    ``qtype`` is the type of the blocks' linear weights: ``auto`` writes quantized weights from their codes
    (refusing grids with no GGUF block type) and dense ones as f16; a block type re-quantizes every weight
    whose codes are not already that type; a float type writes the (dequantized) weights as floats.
    ``embed_type`` is the type of the token embeddings and the output head: ``auto`` is ``qtype`` when that is
    q8_0 or a float type, and f16 otherwise (their codes, when the head was quantized and the type matches).
    Norms and biases are always f32. Returns the export summary (types, per-tensor error, sizes).
    """
    qtype, embed_type = str(qtype).lower(), str(embed_type).lower()
    if qtype not in TYPES:
        raise UserError(f"unknown GGUF type {qtype!r} for qtype: choose {', '.join(TYPES)}", param="qtype")
    if embed_type not in EMBED_TYPES:
        raise UserError(
            f"unknown GGUF type {embed_type!r} for embed_type: choose {', '.join(EMBED_TYPES)}", param="embed_type"
        )
    gguf = _gguf()
    out = _check_output(output, overwrite, source)
    path = Path(str(source)).expanduser()
    recipe = read_recipe(path) if path.is_dir() else None
    if recipe and any(r.get("kind") == "skip" for r in recipe.get("surgery") or []):
        raise UserError(
            f"{source} skips the attention or FFN of some blocks (shrink sublayers): llama.cpp's graphs run every "
            "block's attention and FFN and GGUF has no way to mark one absent (zero weights would compute the same "
            "values at the full size and time); remove whole blocks with `shrink blocks` for a GGUF, or use "
            "lmcompress.load"
        )
    if recipe and recipe.get("surgery"):
        raise UserError(
            f"{source} has resized or factorized layers (surgery): llama.cpp's graphs expect the original shapes; "
            "GGUF export takes pruned and quantized models only"
        )
    config, tokenizer, state, quantized = _read_source(
        source, recipe, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
    )
    family = gguf_family(config)
    warnings: list[str] = []
    _check_config(config, warnings)
    names = tensor_name_map(family, int(config.num_hidden_layers))
    tied = bool(getattr(config, "tie_word_embeddings", False))
    mix = qtype if qtype in MIXES else None
    if mix is not None:  # llama.cpp's type for every weight, the head and embedding included
        types = mix_types(mix, config, {k: v.shape[-1] for k, v in state.items() if v.dim() == 2})
    if embed_type == "auto" and mix is None:
        embed_type = qtype if qtype in ("q8_0", "f16", "bf16", "f32") else "f16"

    if mix is not None and any(v.dim() == 3 for v in state.values()):
        raise UserError(
            f"the {mix} mix does not cover fused routed experts yet: export this model with a single type "
            "(auto, q4_0, q8_0, q4_k, f16 ...)",
            param="qtype",
        )
    plan: list[tuple[str, str, torch.Tensor, QuantizedTensor | None, str]] = []  # (hf, gguf, ref, q, kind)
    unmapped, refused = [], []
    for hf_name, ref, q in _expert_matrices(state, quantized):
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reads token_embd as the output head when output.weight is absent
        gname = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None:
            unmapped.append(hf_name)
            continue
        if ref.dim() == 3 and not gname.endswith(".weight"):
            gname += ".weight"  # blk.N.ffn_down_exps.weight [E, H, I]
        if q is None and tied and gname == "token_embd.weight":
            q = quantized.get("lm_head.weight")  # the tied head quantized: the embedding holds its codes
        heads = rotary_rows(hf_name, config)
        if heads is not None:
            order = rotary_row_order(ref.shape[0], heads)
            ref = ref[order]
            if q is not None:
                q = QuantizedTensor(q.codes[order], q.scale[order], q.zero[order], q.spec, q.g_idx)
        if ref.dim() == 1 or gname.endswith(_ROUTERS):  # routers in f32, as llama.cpp's converter keeps them
            kind = "f32"
        elif gname in _EMBEDDINGS and embed_type != "auto":
            kind = embed_type
        elif mix is not None:
            kind = types.get(hf_name, "f16")
        elif gname in _EMBEDDINGS:
            kind = embed_type
        elif q is not None and qtype == "auto":
            kind, why = exact_block_type(q)
            if kind is None:
                refused.append(f"{hf_name} ({why})")
        else:
            kind = "f16" if qtype == "auto" else qtype
        plan.append((hf_name, gname, ref, q, kind))
    if unmapped:
        raise UserError(
            f"{len(unmapped)} tensors have no llama.cpp name for {arch_name(family)}: {', '.join(unmapped[:5])}; "
            "the GGUF export covers the standard layout of the families in models/gguf_names.py"
        )
    if refused:
        raise UserError(
            f"{len(refused)} quantized layers are on a grid that GGUF cannot hold as it is: {'; '.join(refused[:3])}"
            f"{f' and {len(refused) - 3} more' if len(refused) > 3 else ''}. Pass type q4_0, q4_1 or q8_0 to "
            "re-quantize them with round-to-nearest (the export reports the error it adds), or type f16 for the "
            "dequantized weights",
            param="qtype",
        )

    tensors = [_encode(g, ref, q, kind) for _, g, ref, q, kind in plan]
    if not tied and not any(t.name == "output.weight" for t in tensors):
        raise UserError("the model has untied embeddings but no lm_head.weight to write as output.weight")
    n_vocab = int(state["model.embed_tokens.weight"].shape[0])
    linear = [t for t in tensors if t.name.startswith("blk.") and t.source != "vector"]
    main_type = max({t.type for t in linear}, key=lambda k: sum(x.type == k for x in linear)) if linear else "f32"
    file_type = {
        "f32": gguf.LlamaFileType.ALL_F32,
        "f16": gguf.LlamaFileType.MOSTLY_F16,
        "bf16": gguf.LlamaFileType.MOSTLY_BF16,
        "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
        "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
        "q5_1": gguf.LlamaFileType.MOSTLY_Q5_1,
        "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
        "q2_k": gguf.LlamaFileType.MOSTLY_Q2_K,
        "q3_k": gguf.LlamaFileType.MOSTLY_Q3_K_S,  # every block tensor one type: llama.cpp's "small" mixes
        "q4_k": gguf.LlamaFileType.MOSTLY_Q4_K_S,
        "q5_k": gguf.LlamaFileType.MOSTLY_Q5_K_S,
        "q6_k": gguf.LlamaFileType.MOSTLY_Q6_K,
    }[main_type]
    if mix is not None:
        file_type, main_type = getattr(gguf.LlamaFileType, MIXES[mix][1]), mix
    is_quantized = any(t.type in _BLOCK_TYPES for t in tensors)
    name = path.name if path.exists() else str(source).rsplit("/", 1)[-1]
    tokenizer_info: dict = {}

    def write(tmp: Path) -> None:
        with _quiet_gguf():
            w = gguf.GGUFWriter(tmp, arch_name(family))
            try:
                _add_model_metadata(w, config, n_vocab, name, int(file_type), is_quantized)
                tokenizer_info.update(_add_tokenizer(w, tokenizer, config, n_vocab))
                for t in tensors:
                    raw = _ggml_type(t.type) if t.data.dtype == np.uint8 else None
                    w.add_tensor(t.name, t.data, raw_dtype=raw)
                w.write_header_to_file()
                w.write_kv_data_to_file()
                w.write_tensors_to_file()
            finally:
                w.close()

    write_path_atomic(out, write)
    for message in warnings:
        log.warning("%s", message)
    return _summary(tensors, out, source, arch_name(family), main_type, tokenizer_info, warnings, tied)


def _summary(tensors, out: Path, source, arch: str, main_type: str, tokenizer: dict, warnings, tied) -> dict:
    matrices = [t for t in tensors if t.source != "vector"]

    def stats(group: list[_Tensor]) -> dict:
        errors = [t.rel_error for t in group]
        return {
            "tensors": len(group),
            "max_rel_error": max(errors) if errors else 0.0,
            "mean_rel_error": sum(errors) / len(errors) if errors else 0.0,
        }

    types: dict[str, int] = {}
    for t in tensors:
        types[t.type.upper()] = types.get(t.type.upper(), 0) + 1
    zeros = sum(t.zeros for t in tensors if t.name.startswith("blk."))
    kept = sum(t.zeros_kept for t in tensors if t.name.startswith("blk."))
    return {
        "format": "gguf",
        "output": str(out),
        "bytes": out.stat().st_size,
        "exported_from": str(source),
        "architecture": arch,
        "file_type": main_type.upper(),
        "tensor_types": types,
        "tied_embeddings": tied,
        "from_codes": stats([t for t in matrices if t.source == "codes"]),
        "requantized": stats([t for t in matrices if t.source == "requantized"]),
        "cast_to_float": stats([t for t in matrices if t.source == "float"]),
        "zeros_in_blocks": zeros,
        "zeros_kept": kept,
        "tokenizer": tokenizer,
        "warnings": list(warnings),
        "layers": {t.name: {"type": t.type.upper(), "source": t.source, "rel_error": t.rel_error} for t in matrices},
    }
