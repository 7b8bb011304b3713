"""llama.cpp's quantization mixes (``llama-quantize … Q4_K_M``): the GGUF type each weight tensor gets.

A mix names a default block type and raises some tensors to more bits. The rules below are read from
llama.cpp's ``src/llama-quant.cpp`` (``llama_tensor_get_type_impl`` and ``tensor_type_fallback``, the
version vendored by llama-cpp-python 0.3.36), restated as one table for dense decoder models. With ``L``
blocks, block ``i`` and

    more_bits(i, L) = i < L/8  or  i ≥ 7L/8  or  (i − L/8) mod 3 = 2      (integer divisions, C remainder)

=========  =======  =========================  ===========================  ===========  ===========
mix        default  attn_v                     ffn_down                     attn_output  output
=========  =======  =========================  ===========================  ===========  ===========
q2_k       Q2_K     Q4_K if GQA ≥ 4 else Q3_K  Q3_K                         Q3_K         Q6_K
q3_k_m     Q3_K     Q5_K if i < 2 else Q4_K    Q5_K if i < L/16 else Q4_K   Q4_K         Q6_K
q4_k_m     Q4_K     Q6_K if more_bits else —   Q6_K if more_bits else —     —            Q6_K
q5_k_m     Q5_K     Q6_K if more_bits else —   Q6_K if more_bits else —     —            Q6_K
q6_k       Q6_K     —                          —                            —            Q6_K
q4_0_mix   Q4_0     —                          Q4_1 if i < L/8 else —       —            Q6_K
q5_0_mix   Q5_0     —                          Q5_1 if i < L/8 else —       —            Q6_K
=========  =======  =========================  ===========================  ===========  ===========

(— : the default.) ``attn_q``, ``attn_k``, ``ffn_gate``, ``ffn_up`` and the token embedding take the default.
GQA is ``n_head / n_head_kv``; llama.cpp counts ``attn_v`` tensors in file order, which for a dense model is the
block index. The output head is Q6_K, or Q8_0 when its rows are not whole 256-weight super-blocks; a model with
tied embeddings has no ``output.weight`` and its ``token_embd`` takes the output's rule instead.

Fallbacks: a tensor whose row (``ne0``, the input width) is not a multiple of the type's block gets
Q2_K, Q3_K → Q4_0; Q4_K → Q5_0; Q5_K → Q5_1; Q6_K → Q8_0 (32-weight blocks), and F16 if even 32 does not
divide it. All of these are grids lmcompress solves and writes (:mod:`lmcompress.algorithms.quant`, each with
llama.cpp's own rounding, Q4_1 included).

``q4_0_mix`` / ``q5_0_mix`` are ``llama-quantize --imatrix … Q4_0`` / ``Q5_0``: llama.cpp raises the first
``L/8`` ``ffn_down`` to Q4_1 / Q5_1 only when given an importance matrix. Without one its Q4_0 is Q4_0 throughout
but the head (and an untied token embedding, Q4_0); the plain ``q4_0`` grid / ``export --type q4_0`` is not a mix.

Not covered (refused or absent from the families GGUF export knows): mixture-of-experts rules (``n_expert``
of 8 raises ``attn_v`` / ``attn_k`` to Q8_0 and ``attn_output`` to Q5_K), fused ``attn_qkv``, Falcon's
rules, and the 70B-class ``attn_v`` bump (Q3_K / Q4_K → Q5_K when llama.cpp's model type is 70B).
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcompress.errors import UserError

QK_K = 256
LEGACY_BLOCK = 32

# mix → (default type, GGUF file type name: gguf.LlamaFileType member)
MIXES: dict[str, tuple[str, str]] = {
    "q2_k": ("q2_k", "MOSTLY_Q2_K"),
    "q3_k_m": ("q3_k", "MOSTLY_Q3_K_M"),
    "q4_k_m": ("q4_k", "MOSTLY_Q4_K_M"),
    "q5_k_m": ("q5_k", "MOSTLY_Q5_K_M"),
    "q6_k": ("q6_k", "MOSTLY_Q6_K"),
    "q4_0_mix": ("q4_0", "MOSTLY_Q4_0"),  # llama-quantize --imatrix … Q4_0
    "q5_0_mix": ("q5_0", "MOSTLY_Q5_0"),  # llama-quantize --imatrix … Q5_0
}

# the _0 mixes' early ffn_down type (llama.cpp raises it only when given an imatrix)
_GUARD = {"q4_0_mix": "q4_1", "q5_0_mix": "q5_1"}

# type → llama.cpp's replacement when a row is not whole blocks of that type
FALLBACK: dict[str, str] = {"q2_k": "q4_0", "q3_k": "q4_0", "q4_k": "q5_0", "q5_k": "q5_1", "q6_k": "q8_0"}

# block size (weights per block along a row) of every type a mix can give
BLOCK_SIZE: dict[str, int] = {
    **dict.fromkeys(("q2_k", "q3_k", "q4_k", "q5_k", "q6_k"), QK_K),
    **dict.fromkeys(("q4_0", "q4_1", "q5_0", "q5_1", "q8_0"), LEGACY_BLOCK),
    **dict.fromkeys(("f16", "bf16", "f32"), 1),
}

# GGUF tensor-name piece → category (as llama.cpp's tensor_get_category, by substring, first match wins)
_CATEGORIES = (
    ("attn_qkv.weight", "attn_qkv"),
    ("attn_v.weight", "attn_v"),
    ("attn_k.weight", "attn_k"),
    ("attn_q.weight", "attn_q"),
    ("attn_output.weight", "attn_output"),
    ("ffn_up", "ffn_up"),
    ("ffn_gate", "ffn_gate"),
    ("ffn_down", "ffn_down"),
)


def check_mix(mix: str, param: str = "gguf_mix") -> str:
    """``mix`` lower-cased; UserError naming the mixes when it is not one of them."""
    name = str(mix).lower()
    if name not in MIXES:
        raise UserError(f"unknown GGUF mix {mix!r}: choose one of {', '.join(MIXES)}", param=param)
    return name


def more_bits(i: int, n: int) -> bool:
    """llama.cpp's ``use_more_bits``: the first and last eighth of the ``n`` layers and every third one between."""
    first = n // 8
    d = i - first
    rem = d - int(d / 3) * 3 if d < 0 else d % 3  # C's remainder (sign of the dividend)
    return i < first or i >= 7 * n // 8 or rem == 2


def category(gguf_name: str) -> str:
    """llama.cpp's tensor category of ``gguf_name``: token_embd, output, attn_v, ffn_down, ... or ``other``."""
    if gguf_name == "output.weight":
        return "output"
    if gguf_name == "token_embd.weight":
        return "token_embd"
    for piece, cat in _CATEGORIES:
        if piece in gguf_name:
            return cat
    return "other"


def block_index(gguf_name: str) -> int | None:
    """``i`` of ``blk.i.…``, else None."""
    parts = gguf_name.split(".")
    return int(parts[1]) if len(parts) > 2 and parts[0] == "blk" and parts[1].isdigit() else None


@dataclass(frozen=True)
class MixModel:
    """What the mix rules read of a model: blocks, grouped-query ratio, experts, tied embeddings."""

    n_layers: int
    n_gqa: int = 1
    n_expert: int = 1
    tied: bool = False

    @classmethod
    def from_config(cls, config) -> MixModel:
        heads = int(config.num_attention_heads)
        kv = int(getattr(config, "num_key_value_heads", None) or heads)
        experts = int(getattr(config, "num_local_experts", None) or getattr(config, "num_experts", None) or 1)
        return cls(
            n_layers=int(config.num_hidden_layers),
            n_gqa=heads // kv,
            n_expert=experts,
            tied=bool(getattr(config, "tie_word_embeddings", False)),
        )


def rule_type(mix: str, cat: str, layer: int | None, model: MixModel) -> str:
    """The type the mix's rules give a tensor of category ``cat`` in block ``layer``, before the row-width
    fallback (the output head: Q6_K; see :func:`tensor_type` for its Q8_0 case)."""
    mix = check_mix(mix)
    default = MIXES[mix][0]
    if model.n_expert > 1:
        raise UserError(
            "GGUF mixes: mixture-of-experts models are not covered (llama.cpp's expert rules are not in "
            "models/gguf_mixes.py)",
            param="gguf_mix",
        )
    if cat == "output" or (cat == "token_embd" and model.tied):
        return "q6_k"
    n, i = model.n_layers, layer if layer is not None else 0
    if cat in ("attn_v", "attn_qkv"):
        if mix == "q2_k":
            return "q4_k" if model.n_gqa >= 4 else "q3_k"
        if mix == "q3_k_m":
            return "q5_k" if i < 2 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and more_bits(i, n):
            return "q6_k"
        return default
    if cat == "ffn_down":
        if mix == "q2_k":
            return "q3_k"
        if mix == "q3_k_m":
            return "q5_k" if i < n // 16 else "q4_k"
        if mix in ("q4_k_m", "q5_k_m") and more_bits(i, n):
            return "q6_k"
        if mix in _GUARD and i < n // 8:
            return _GUARD[mix]
        return default
    if cat == "attn_output":
        return {"q2_k": "q3_k", "q3_k_m": "q4_k"}.get(mix, default)
    return default


def fallback(kind: str, cols: int) -> str:
    """``kind``, or llama.cpp's replacement when ``cols`` is not whole blocks of it (F16 as the last resort)."""
    if cols % BLOCK_SIZE[kind] == 0:
        return kind
    kind = FALLBACK.get(kind, kind)
    return kind if cols % BLOCK_SIZE[kind] == 0 else "f16"


def tensor_type(mix: str, gguf_name: str, cols: int, model: MixModel) -> str:
    """The GGUF type llama.cpp's ``mix`` gives the weight ``gguf_name`` whose rows have ``cols`` inputs."""
    cat = category(gguf_name)
    kind = rule_type(mix, cat, block_index(gguf_name), model)
    if (cat == "output" or (cat == "token_embd" and model.tied)) and cols % QK_K:
        return fallback("q8_0", cols)  # the output's own rule: a head that is not whole super-blocks is Q8_0
    return fallback(kind, cols)


def mix_types(mix: str, config, widths: dict[str, int]) -> dict[str, str]:
    """The GGUF type of each Hugging Face weight in ``widths`` (HF parameter name → row width, i.e. inputs) under
    ``mix`` for the model ``config``. Names without a GGUF name, and 1-D tensors, are left out. A tied
    ``lm_head.weight`` is the token embedding (llama.cpp's output rule applies to it)."""
    from lmcompress.models.gguf_names import gguf_family, tensor_name_map

    mix = check_mix(mix)
    model = MixModel.from_config(config)
    names = tensor_name_map(gguf_family(config), model.n_layers)
    out = {}
    for hf_name, cols in widths.items():
        gname = "token_embd.weight" if model.tied and hf_name == "lm_head.weight" else None
        gname = gname or names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gname is None or not gname.endswith(".weight") or category(gname) == "other":
            continue
        out[hf_name] = tensor_type(mix, gname, cols, model)
    return out


def mix_table(mix: str, config) -> dict[str, str]:
    """The GGUF type of every weight of a standard llama / qwen2 model ``config`` (GGUF name → type), from its
    shapes alone: for documentation and the CLI summary."""
    model = MixModel.from_config(config)
    hidden, ffn = int(config.hidden_size), int(config.intermediate_size)
    heads = int(config.num_attention_heads)
    head_dim = int(getattr(config, "head_dim", None) or hidden // heads)
    widths = {"attn_q": hidden, "attn_k": hidden, "attn_v": hidden, "attn_output": heads * head_dim}
    widths |= {"ffn_gate": hidden, "ffn_up": hidden, "ffn_down": ffn}
    out = {"token_embd.weight": tensor_type(mix, "token_embd.weight", hidden, model)}
    if not model.tied:
        out["output.weight"] = tensor_type(mix, "output.weight", hidden, model)
    for i in range(model.n_layers):
        for piece, cols in widths.items():
            name = f"blk.{i}.{piece}.weight"
            out[name] = tensor_type(mix, name, cols, model)
    return out


def type_spec(kind: str):
    """The lmcompress grid (:class:`~lmcompress.algorithms.quant.QuantSpec`) whose codes are GGUF type ``kind``
    byte for byte, or None for the float types."""
    from lmcompress.algorithms.quant import LEGACY, QuantSpec, kquant_spec

    if kind in LEGACY:
        bits, sym = LEGACY[kind]
        return QuantSpec(bits, LEGACY_BLOCK, sym, kind)
    if kind in FALLBACK:
        return kquant_spec(kind)
    return None
