"""Loading models safely and saving results atomically (temp folder, then rename)."""

from __future__ import annotations

import json
import logging
import re
import shutil
import uuid
from pathlib import Path

import torch
from torch import nn

from lmcompress.errors import UserError
from lmcompress.families import family_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
RECIPE_FILE = "lmcompress.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# config.json marker of folders that only lmcompress.load reads: plain transformers warns with this text
RESIZED_MARKER = "lmcompress-resized (load with lmcompress.load)"


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
                "arbitrary code when loaded; convert them to safetensors, or pass --allow-pickle if you trust them"
            )
        if not pickles:
            raise UserError(f"{path} holds no weight files (*.safetensors)")


def resolve_source(source: str | Path, allow_pickle: bool = False) -> str:
    """A local model folder (checked) or a hub id; anything path-like that does not exist is an error."""
    text = str(source)
    path = Path(text).expanduser()
    if path.exists():
        _check_local_folder(path, allow_pickle)
        return str(path)
    if text.startswith(("/", "./", "../", "~", ".")) or not _HUB_ID.match(text):
        raise UserError(f"model path {text} does not exist; give an existing model folder or a hub id (org/name)")
    return text


def load_config(source: str, trust_remote_code: bool = False):
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        if "trust_remote_code" in str(exc):
            raise UserError(
                f"{source} needs custom code from its repository; pass --trust-remote-code if you trust it"
            ) from None
        raise UserError(f"could not load the config of {source!r}: {exc}") from None


# Encoders: the Auto class that keeps the head named by the config's ``architectures`` (suffix → class name).
# A bare encoder (``BertModel``, sentence-embedding models) and unknown heads load with ``AutoModel``.
ENCODER_AUTO_CLASSES = {
    "ForMaskedLM": "AutoModelForMaskedLM",
    "LMHeadModel": "AutoModelForCausalLM",  # BertLMHeadModel (is_decoder=True): keep its head
    "ForPreTraining": "AutoModelForPreTraining",
    "ForSequenceClassification": "AutoModelForSequenceClassification",
    "ForTokenClassification": "AutoModelForTokenClassification",
    "ForQuestionAnswering": "AutoModelForQuestionAnswering",
    "ForMultipleChoice": "AutoModelForMultipleChoice",
}


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

    Folders written by lmcompress with packed weights are loaded through their own recipe.
    """
    from transformers import AutoTokenizer

    resolved = resolve_source(source, allow_pickle)
    config = load_config(resolved, trust_remote_code)
    family_of(config)
    recipe = read_recipe(resolved) if Path(resolved).is_dir() else None
    if recipe and (recipe.get("storage") == "packed" or recipe.get("surgery")):
        from lmcompress.loader import load

        return load(resolved, dtype=dtype, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle)
    try:
        model = auto_model_class(config).from_pretrained(
            resolved,
            dtype=parse_dtype(dtype),
            use_safetensors=None if allow_pickle else True,
            trust_remote_code=trust_remote_code,
        )
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"could not load model {resolved!r}: {exc}") from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(resolved, trust_remote_code=trust_remote_code)
    except Exception as exc:
        raise UserError(f"could not load the tokenizer of {resolved!r}: {exc}") from None
    model.eval()
    return model, tokenizer


def source_dtype(config) -> torch.dtype | None:
    """The dtype the checkpoint was stored in, if its config records it."""
    value = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(value, str):
        value = DTYPES.get(value)
    return value if isinstance(value, torch.dtype) else None


def check_output(output: str | Path, overwrite: bool, source: str | Path | None = None) -> Path:
    """Refuse an output folder that exists (unless ``overwrite``) or that is the source model itself."""
    out = Path(output).expanduser()
    if (
        source is not None
        and Path(str(source)).expanduser().exists()
        and out.resolve() == Path(str(source)).expanduser().resolve()
    ):
        raise UserError(f"output {out} is the source model folder; lmcompress never modifies its input")
    if out.exists() and not overwrite:
        raise UserError(f"output folder {out} already exists; choose another --output or pass --overwrite")
    if out.exists() and not out.is_dir():
        raise UserError(f"output {out} exists and is not a folder")
    if not out.parent.exists():
        raise UserError(f"the parent folder of --output ({out.parent}) does not exist")
    return out


def save_atomic(out_dir: str | Path, write, *, overwrite: bool) -> Path:
    """Call ``write(tmp_folder)`` then move the folder into place; nothing half-written is ever left."""
    out = check_output(out_dir, overwrite)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            out.rename(old)
            tmp.rename(out)
            shutil.rmtree(old)
        else:
            tmp.rename(out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def save_model(
    model: nn.Module, tokenizer, out_dir: str | Path, recipe: dict, *, overwrite: bool = False, dtype=None
) -> Path:
    """Save a model that loads with ``from_pretrained``, its tokenizer and the ``lmcompress.json`` recipe."""

    def write(tmp: Path) -> None:
        state = None
        if dtype is not None:  # store in the checkpoint's own dtype without touching the in-memory model
            state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state)
        config = json.loads((tmp / "config.json").read_text())
        if dtype is not None:
            config["dtype"] = str(dtype).removeprefix("torch.")
        if recipe.get("surgery"):
            _guard_from_plain_loading(tmp, config)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RECIPE_FILE).write_text(json.dumps(recipe, indent=2, default=str) + "\n")

    return save_atomic(out_dir, write, overwrite=overwrite)


def _guard_from_plain_loading(folder: Path, config: dict) -> None:
    """Make plain ``from_pretrained`` fail loudly on a folder whose layers its config cannot describe.

    Without this it may load such a folder *wrongly*: a bias that the config has no flag for is dropped with
    a mere warning. The weight files keep their content (``lmcompress.load`` reads every ``*.safetensors``)
    but lose the names transformers looks for, and the config names the way to load them.
    """
    for name in ("model.safetensors", "model.safetensors.index.json"):
        if (folder / name).exists():
            (folder / name).rename(folder / name.replace("model.safetensors", "model.resized.safetensors"))
    config["quantization_config"] = {"quant_method": RESIZED_MARKER}


def read_recipe(folder: str | Path) -> dict | None:
    path = Path(folder) / RECIPE_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is not valid JSON ({exc}); the folder is damaged") from None
