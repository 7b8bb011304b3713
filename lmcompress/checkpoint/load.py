"""The one loader: safe loading of any source (hub id, plain folder, folder lmcompress wrote, ``.gguf`` file)."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import torch
from torch import nn

from lmcompress.checkpoint.checks import (
    check_config_sizes,
    check_finite,
    check_fits_in_memory,
    check_integer_weights,
    check_loading_info,
    check_state_dtypes,
    expand,
    path_exists,
    regular_file,
    tokenizer_error,
    weight_files,
)
from lmcompress.checkpoint.folder import RECIPE_FILE, read_recipe
from lmcompress.checkpoint.gguf import check_gguf, gguf_config, is_gguf, load_gguf
from lmcompress.checkpoint.schemes import recipe_scheme
from lmcompress.errors import UserError
from lmcompress.models.families import ENCODER_AUTO_CLASSES, family_of
from lmcompress.models.surgery import apply_surgery

log = logging.getLogger(__name__)


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def parse_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise UserError(f"unknown dtype {name!r}: choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def _check_local_folder(path: Path, allow_pickle: bool) -> None:
    if not path.is_dir():
        raise UserError(f"model path {path} is not a folder; give a model folder or a hub id")
    if not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json: is it a Hugging Face model folder?")
    files = [p.name for p in path.iterdir()]
    if not any(f.endswith(".safetensors") for f in files):
        pickles = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
        if pickles and not allow_pickle:
            raise UserError(
                f"{path} holds only pickle checkpoints ({', '.join(sorted(pickles)[:3])}), which can run "
                "arbitrary code when loaded; convert them to safetensors, or pass allow_pickle if you trust them",
                param="allow_pickle",
            )
        if not pickles:
            raise UserError(f"{path} holds no weight files (*.safetensors)")
    for f in path.iterdir():  # a FIFO or a device (weights, config, tokenizer) would block its reader forever
        if not f.is_dir():
            regular_file(f, "model file")


def _missing_path(text: str, path: Path) -> UserError | None:
    """The error for a source that names a local path that is not there (a broken link or a link loop
    included), or None when ``text`` may be a hub id."""
    if path.is_symlink():
        return UserError(f"model path {text} is a symbolic link to nothing (broken, or a loop); fix the link")
    looks_local = text.startswith(("/", "./", "../", "~", ".")) or not _HUB_ID.match(text)
    first = Path(text).parts[0] if Path(text).parts else ""
    if looks_local or ("/" in text and Path(first).is_dir()):  # "work/dense" with a local folder "work"
        return UserError(f"model path {text} does not exist; give an existing model folder or a hub id (org/name)")
    return None


def resolve_source(source: str | Path, allow_pickle: bool = False) -> str:
    """A local model folder (checked), a ``.gguf`` file or a hub id; anything path-like that does not exist is an
    error."""
    text = str(source)
    path = expand(text)
    if is_gguf(text):  # llama.cpp file: loaded dequantized (lmcompress.checkpoint.gguf)
        return str(check_gguf(path))
    try:
        exists = path.exists()
    except OSError as exc:  # a name too long, a loop...
        raise UserError(f"model path {text} cannot be used ({exc.strerror or exc})") from None
    if exists:
        _check_local_folder(path, allow_pickle)
        return str(path)
    error = _missing_path(text, path)
    if error is not None:
        raise error
    return text


def load_config(source: str, trust_remote_code: bool = False):
    """The transformers config of ``source``, its sizes checked against what this machine can hold."""
    from transformers import AutoConfig

    if is_gguf(source):
        config = gguf_config(source)
    else:
        try:
            config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
        except Exception as exc:
            raise _config_error(source, exc) from None
    check_config_sizes(config, source)
    return config


def _config_error(source: str, exc: Exception) -> UserError:
    if "trust_remote_code" in str(exc):
        return UserError(
            f"{source} needs custom code from its repository; pass trust_remote_code if you trust it",
            param="trust_remote_code",
        )
    if not Path(source).exists() and any(w in str(exc).lower() for w in ("connect", "offline", "resolve", "network")):
        return UserError(
            f"{source} is not a local folder, and the Hugging Face hub could not be reached to fetch it: check the "
            "name (a local path must exist) or your network"
        )
    return UserError(f"could not load the config of {source!r}: {exc}")


def auto_model_class(config):
    """The ``transformers`` Auto class that builds models of ``config``'s kind."""
    import transformers

    if family_of(config).kind == "decoder":
        return transformers.AutoModelForCausalLM
    for arch in getattr(config, "architectures", None) or []:
        for suffix, name in ENCODER_AUTO_CLASSES.items():
            if arch.endswith(suffix):
                return getattr(transformers, name)
        if not arch.endswith("Model"):
            log.warning("no Auto class known for the %s head: loading the bare encoder without it", arch)
    return transformers.AutoModel


def load_model(
    source: str | Path,
    *,
    dtype: str = "float32",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a local folder or the hub, safetensors only unless ``allow_pickle``.

    Folders written by lmcompress with packed weights are loaded through their own recipe; a ``.gguf`` file is
    loaded dequantized to ``dtype`` (``lmcompress unpack FILE.gguf -o FOLDER`` saves it as a plain folder).
    """
    from transformers import AutoTokenizer

    resolved = resolve_source(source, allow_pickle)
    if is_gguf(resolved):
        return load_gguf(resolved, dtype=parse_dtype(dtype))
    config = load_config(resolved, trust_remote_code)
    family_of(config)
    recipe = read_recipe(resolved) if Path(resolved).is_dir() else None
    if recipe and (recipe.get("storage") == "packed" or recipe.get("surgery")):
        return load(resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    check_fits_in_memory(config, resolved, parse_dtype(dtype))
    if Path(resolved).is_dir():
        weight_files(Path(resolved))  # headers checked before transformers reads them
    model = _from_pretrained(resolved, config, dtype, trust_remote_code, allow_pickle)
    drop_foreign_auto_map(model, resolved, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise tokenizer_error(resolved, exc) from None
    model.eval()
    return model, tokenizer


def _from_pretrained(source: str, config, dtype: str, trust_remote_code: bool, allow_pickle: bool) -> nn.Module:
    """``from_pretrained`` with every tensor checked: none missing or unexpected, none stored as integers where the
    model has float weights, none NaN or infinite."""
    auto_class = auto_model_class(config)
    try:
        model, loading = auto_class.from_pretrained(
            source,
            dtype=parse_dtype(dtype),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
            output_loading_info=True,
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not load model {source!r}: {exc}") from None
    check_loading_info(loading, source, bare=auto_class.__name__ == "AutoModel")
    if Path(source).is_dir():
        check_integer_weights(model, weight_files(Path(source)))
    check_finite(model, source)
    return model


def drop_foreign_auto_map(model: nn.Module, source: str, trust_remote_code: bool) -> None:
    """A config with ``auto_map`` loaded without ``--trust-remote-code`` ran the built-in class of its
    ``model_type``, not the repository's code: say so, and drop ``auto_map`` so that the outputs (which do not
    carry that code) do not point at files they lack. With ``--trust-remote-code`` the repository's class runs
    and ``auto_map`` stays (transformers copies the code files it registered next to saved models)."""
    config = model.config
    if trust_remote_code or not getattr(config, "auto_map", None):
        return
    log.warning(
        "%s has custom code (auto_map) but was loaded with the built-in %s class of model_type %r; outputs "
        "will not carry auto_map. Allow trust_remote_code to use (and keep) the repository's code",
        source,
        type(model).__name__,
        config.model_type,
    )
    del config.auto_map


def source_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint was stored in, if its config records it."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def needs_lmcompress(folder: str | Path) -> bool:
    """True when plain ``from_pretrained`` cannot load ``folder`` (packed weights or module surgery)."""
    recipe = read_recipe(folder) if Path(str(folder)).is_dir() else None
    return bool(recipe and (recipe.get("storage") == "packed" or recipe.get("surgery")))


def build_skeleton(config, dtype: torch.dtype, records: list[dict] | None = None) -> nn.Module:
    """The model class of ``config`` with surgery ``records`` applied, weights left for a state dict to fill."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # older transformers
        from transformers.modeling_utils import no_init_weights
    with no_init_weights():
        model = auto_model_class(config).from_config(config, dtype=dtype)
    return apply_surgery(model, records or [])


def read_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of the (possibly sharded) ``*.safetensors`` files of ``folder``."""
    from safetensors.torch import load_file

    files = weight_files(folder)
    if not files:
        raise UserError(f"{folder} holds no *.safetensors weight files")
    state: dict[str, torch.Tensor] = {}
    for f in files:
        try:
            state.update(load_file(f))
        except Exception as exc:
            raise UserError(f"cannot read {f}: {exc}; the file may be truncated or corrupted") from None
    return state


def fill(model: nn.Module, state: dict[str, torch.Tensor], folder: Path) -> nn.Module:
    """Load ``state`` into ``model`` strictly (tied weights excepted), with an error naming what does not fit."""
    tied = set(getattr(model, "_tied_weights_keys", None) or [])
    check_state_dtypes(model, state, folder)
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shape mismatches
        raise UserError(
            f"the weights in {folder} do not fit the model described by its config and {RECIPE_FILE}: "
            f"{str(exc).splitlines()[-1].strip()}; the folder may be damaged or edited"
        ) from None
    missing = [k for k in missing if k not in tied and not any(k.endswith(t) for t in tied)]
    if missing or unexpected:
        raise UserError(
            f"the weights in {folder} do not fit the model described by its config and {RECIPE_FILE}: "
            f"missing {missing[:5]}, unexpected {unexpected[:5]}; the folder may be damaged or incomplete"
        )
    if getattr(model.config, "tie_word_embeddings", False):
        model.tie_weights()
    return model.eval()


def load(
    folder: str | Path,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    kernels: str = "none",
) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` from a folder written by lmcompress, or any model plain transformers loads.

    ``kernels="auto"`` runs the quantized layers of a packed folder from their codes on CPU kernels
    (:mod:`lmcompress.kernels`: lmcompress's AVX2 kernel where it builds, else PyTorch's weight-only ops; never
    dequantized in memory), ``"aten"`` on PyTorch's ops only, the others dequantized as with ``"none"``;
    ``model.lmcompress_kernels`` then reports what runs how. A W8A8 / FP8 folder (``quantize --scheme``) loads
    with :class:`~lmcompress.algorithms.actquant.ActQuantLinear` layers, which quantize their inputs as the
    scheme does; with kernels other than ``"none"`` on CPU its int8 layers run the integer product
    (:mod:`lmcompress.kernels.int8act`).
    """
    from lmcompress.kernels.linear import check_mode, swap_quantized_linears

    check_mode(kernels)
    path = expand(folder)
    path_exists(path)  # a name the file system refuses is an error here, not an OSError below
    if not needs_lmcompress(path):
        model, tokenizer = load_model(
            folder, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle
        )
        if kernels != "none":
            swap_quantized_linears(model, {}, kernels, device=device)  # reports that the model runs dense
            _swap_sparse(model, kernels, device)
        return model.to(device), tokenizer
    from transformers import AutoTokenizer

    recipe = json.loads((path / RECIPE_FILE).read_text())
    config = load_config(str(path), trust_remote_code)
    from lmcompress.checkpoint.packed import strip_marker

    strip_marker(config)  # the marker that stops plain from_pretrained on packed and resized folders
    check_fits_in_memory(config, path, parse_dtype(dtype))
    model = build_skeleton(config, parse_dtype(dtype), recipe.get("surgery"))
    scheme = recipe_scheme(recipe, path)  # W8A8 / FP8: layers rebuilt after filling, to quantize their inputs
    if recipe.get("storage") == "packed":
        from lmcompress.checkpoint.packed import read_packed  # packed layouts (bitmask, N:M, int-packed)

        fp8: dict = {}
        state, quantized = read_packed(path, recipe, dequantize=kernels == "none" or scheme is not None, fp8=fp8)
        if kernels != "none" and scheme is None:  # swap before filling: kernel layers hold codes, others dense weights
            report = swap_quantized_linears(model, quantized, kernels, device=device)
            for name in report.swapped:  # a quantized head tied to the embeddings: its dense copy is theirs alone
                state.pop(f"{name}.weight", None)
            flipped = {k for k, e in recipe["packed"]["tensors"].items() if e.get("transposed")}  # GPT-2 Conv1D
            state.update(
                {
                    k: quantized[k].dequantize().t() if k in flipped else quantized[k].dequantize()
                    for k in report.dense
                    if k not in state
                }
            )
    else:
        state = read_state_dict(path)
        if kernels != "none":
            swap_quantized_linears(model, {}, kernels, device=device)
    state = {k: v.to(parse_dtype(dtype)) if v.is_floating_point() else v for k, v in state.items()}
    fill(model, state, path)
    check_finite(model, path)
    if scheme is None:
        _swap_sparse(model, kernels, device)
    if scheme is not None:
        _install_scheme(model, scheme, quantized, fp8, kernels, device)
    drop_foreign_auto_map(model, str(path), trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise tokenizer_error(path, exc) from None
    model = model.to(device)
    if kernels != "none" and torch.device(device).type == "cuda":
        from lmcompress.kernels.sparse import sparsify_semi_structured

        model.lmcompress_kernels.note += f"; 2:4 sparse layers on CUDA: {len(sparsify_semi_structured(model))}"
    return model, tokenizer


def _swap_sparse(model: nn.Module, kernels: str, device: str) -> None:
    """``kernels="auto"`` on CPU: float 2:4 / 4:8 sparse linear layers run on the sparse kernel
    (:func:`lmcompress.kernels.sparse_cpu.swap_sparse_linears`; quantized ones were swapped with the others)."""
    if kernels != "auto" or torch.device(device).type != "cpu":
        return
    from lmcompress.kernels.linear import kernel_report
    from lmcompress.kernels.sparse_cpu import swap_sparse_linears

    swap_sparse_linears(model, kernel_report(model))


def _install_scheme(model: nn.Module, scheme: dict, quantized: dict, fp8: dict, kernels: str, device: str) -> None:
    """Rebuild a W8A8 / FP8 folder's layers as :class:`~lmcompress.algorithms.actquant.ActQuantLinear` (inputs
    quantized as the scheme runs them); ``model.lmcompress_kernels`` says how they run."""
    from lmcompress.checkpoint.schemes import install_scheme
    from lmcompress.kernels.linear import REPORT_ATTR, KernelReport

    names = install_scheme(model, scheme, quantized, fp8)
    report = KernelReport(kernels, str(device), "float32")
    why = f"{scheme['name']}: activation quantization simulated ({scheme['activations']})"
    report.dense = dict.fromkeys((f"{n}.weight" for n in names), why)
    report.note = why
    if kernels != "none" and torch.device(device).type == "cpu":  # int8 × int8 → int32 layers (kernels.int8act)
        from lmcompress.kernels.int8act import swap_act_quant_linears

        for name, how in swap_act_quant_linears(model).items():
            if "simulated" not in how:
                report.swapped[name] = how
                report.dense.pop(f"{name}.weight", None)
        if report.swapped:
            report.note = f"{scheme['name']}: {scheme['activations']}"
    setattr(model, REPORT_ATTR, report)


def source_surgery(folder: str | Path) -> list[dict]:
    """The surgery records of a source folder (empty for plain models): a new output built from it needs them too."""
    recipe = read_recipe(folder) if Path(str(folder)).is_dir() else None
    return list((recipe or {}).get("surgery") or [])
