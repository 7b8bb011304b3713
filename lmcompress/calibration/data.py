"""Text for calibration and evaluation: local files or Hugging Face datasets, cut into token windows."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from lmcompress.errors import UserError

log = logging.getLogger(__name__)

# Shortcut name → (dataset path, config, field, {role: split}). Loaded through `datasets` (needs a network
# the first time, then the HF cache).
HF_SHORTCUTS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "text", {"calib": "train", "eval": "test"}),
    "c4": ("allenai/c4", None, "text", {"calib": "train", "eval": "validation"}),
    "ptb": ("ptb_text_only", "penn_treebank", "sentence", {"calib": "train", "eval": "test"}),
}
_C4_FILES = {
    "train": "en/c4-train.00000-of-01024.json.gz",
    "validation": "en/c4-validation.00000-of-00008.json.gz",
}
BUNDLED = {
    "bundled:wikitext2-valid": "wikitext2_valid_sample.txt",
    "bundled:wikitext2-test": "wikitext2_test_sample.txt",
}


@dataclass
class TextSource:
    text: str
    description: str  # what was loaded, for the recipe


def load_text(source: str, role: str = "eval") -> TextSource:
    """Load raw text from a file, a bundled sample, a shortcut (``wikitext2``, ``c4``, ``ptb``) or ``hf:NAME``.

    ``hf:PATH[:CONFIG][@SPLIT]`` loads any dataset with a ``text`` column. Documents are joined with blank
    lines, as in the SparseGPT/Wanda evaluation protocol.
    """
    if source in BUNDLED:
        text = resources.files("lmcompress.assets").joinpath(BUNDLED[source]).read_text(encoding="utf-8")
        return TextSource(text, source)
    check_text_source(source)
    path = Path(source).expanduser()
    if path.is_file():
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{path} is not UTF-8 text; give a plain text file") from None
        if not text.strip():
            raise UserError(f"text file {path} is empty; give a file with text in it")
        return TextSource(text, f"file:{path.resolve()}")
    return _load_hf(source, role)


def check_text_source(source: str) -> None:
    """Refuse a data source :func:`load_text` cannot load, without reading it (a job checks this before it
    loads the model): a path that is not a file, or a name that is neither a file nor a known dataset."""
    if source in BUNDLED:
        return
    path = Path(source).expanduser()
    if path.is_file():
        return
    if path.exists():
        raise UserError(f"{path} is not a file; give a text file or a dataset name")
    if source in HF_SHORTCUTS or source.startswith("hf:"):
        return
    raise UserError(
        f"data source {source!r} is neither an existing file nor a known dataset; give a text file path, "
        f"one of {', '.join(HF_SHORTCUTS)}, or hf:DATASET[:CONFIG][@SPLIT]"
    )


def _load_hf(source: str, role: str) -> TextSource:
    try:
        import datasets
    except ImportError:
        raise UserError(f'loading {source!r} needs the `datasets` package: pip install -e ".[hf]"') from None
    if source in HF_SHORTCUTS:
        path, name, column, splits = HF_SHORTCUTS[source]
        split = splits[role]
    else:
        spec = source[3:]
        spec, _, split = spec.partition("@")
        path, _, name = spec.partition(":")
        name, column, split = name or None, "text", split or ("train" if role == "calib" else "test")
    kwargs = {"data_files": {split: _C4_FILES[split]}} if path == "allenai/c4" else {}
    try:
        ds = datasets.load_dataset(path, name, split=split, **kwargs)
    except Exception as exc:  # network, missing dataset, bad split: all reported the same way
        raise UserError(f"could not load dataset {source!r} ({path}, split {split}): {exc}") from None
    if column not in ds.column_names:
        raise UserError(f"dataset {source!r} has no {column!r} column (columns: {ds.column_names})")
    rows = ds[column]
    if path == "allenai/c4":  # a few thousand documents are plenty and keep tokenization quick
        rows = rows[:3000] if role == "calib" else rows[:1100]
    return TextSource("\n\n".join(rows), f"hf:{path}:{name or ''}@{split}")


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    return torch.tensor(tokenizer(text, verbose=False)["input_ids"], dtype=torch.long)


def wants_bos(tokenizer) -> bool:
    """Whether the tokenizer starts every text it encodes with its BOS token (LLaMA, Gemma, OPT's ``</s>``;
    not GPT-2, Qwen2, SmolLM2): its model was trained with BOS first, so every window should start with it."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", verbose=False)["input_ids"]
    return bool(ids) and ids[0] == bos


def _bos_setting(tokenizer, bos: bool | None) -> bool:
    """``bos`` as given, or the tokenizer's own habit (:func:`wants_bos`) for ``None``."""
    if bos is None:
        return wants_bos(tokenizer)
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise UserError("windows starting with BOS need a tokenizer with a BOS token; this one has none")
    return bool(bos)


def _stream(tokenizer, ids: torch.Tensor, bos: bool) -> torch.Tensor:
    """The token stream windows are cut from: the text's ids without the BOS the tokenizer put in front."""
    if bos and ids.numel() and int(ids[0]) == tokenizer.bos_token_id:
        return ids[1:]
    return ids


def check_token_ids(ids: torch.Tensor | list[int], vocab_size: int | None) -> None:
    """Refuse token ids the model has no embedding row for (a tokenizer that does not belong to the model)."""
    if vocab_size is None or not len(ids):
        return
    top = int(max(ids)) if isinstance(ids, list) else int(ids.max())
    if top >= vocab_size:
        raise UserError(
            f"the tokenizer gives token id {top}, but the model's embedding has only {vocab_size} rows: the "
            "tokenizer does not belong to this model; use the tokenizer saved with the model"
        )


def embedding_rows(model) -> int | None:
    """How many token ids ``model`` can embed (its input embedding's rows), None if it has no such layer."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def _with_bos(tokenizer, rows: torch.Tensor) -> torch.Tensor:
    return torch.cat([torch.full((rows.shape[0], 1), tokenizer.bos_token_id, dtype=rows.dtype), rows], 1)


def calibration_windows(
    tokenizer,
    text: str,
    nsamples: int,
    seqlen: int,
    seed: int = 0,
    *,
    ids: torch.Tensor | None = None,
    bos: bool | None = None,
    vocab_size: int | None = None,
    held_out: int = 0,
) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random positions of the tokenized text (seeded); ``ids``:
    the text already tokenized by ``tokenizer``.

    ``bos`` (default: :func:`wants_bos`): every window is the BOS token followed by ``seqlen − 1`` tokens of
    the text. ``vocab_size``: the model's embedding rows, checked against every token id of the text.
    ``held_out``: that many more windows follow the ``nsamples`` (``[nsamples + held_out, seqlen]``), cut from the
    end of the text while the calibration windows are cut from its start, so that no token position is in both
    (:func:`split_stream`). Without them, the calibration windows may start anywhere in the text.
    """
    check_window_request(nsamples + held_out, seqlen)
    bos = _bos_setting(tokenizer, bos)
    ids = _tokenize(tokenizer, text) if ids is None else ids
    check_token_ids(ids, vocab_size)
    stream, width = _stream(tokenizer, ids, bos), seqlen - int(bos)
    if width < 1:
        raise UserError("seqlen must be at least 2 when windows start with BOS", param="seqlen")
    gen = torch.Generator().manual_seed(seed)
    if held_out:
        head, tail = split_stream(stream, nsamples, held_out, seqlen, width)
        rows = torch.cat([_cut(head, nsamples, seqlen, width, gen), _cut(tail, held_out, seqlen, width, gen)])
    else:
        rows = _cut(stream, nsamples, seqlen, width, gen)
    return _with_bos(tokenizer, rows) if bos else rows


def _cut(stream: torch.Tensor, count: int, seqlen: int, width: int, gen: torch.Generator) -> torch.Tensor:
    """``count`` windows of ``width`` tokens of ``stream`` at random starts drawn from ``gen``."""
    if stream.numel() < width + 1:
        raise UserError(
            f"calibration text has {stream.numel()} tokens, fewer than one window of {seqlen}; "
            "give more text or a smaller seqlen",
            param="seqlen",
        )
    positions = stream.numel() - width + 1
    if count > positions:
        raise UserError(
            f"nsamples {count} is more than the {positions} different windows of {seqlen} tokens the calibration "
            "text has; give more text or fewer nsamples",
            param="nsamples",
        )
    starts = torch.randint(0, positions, (count,), generator=gen)
    return torch.stack([stream[s : s + width] for s in starts.tolist()])


def _tokens_for(count: int, width: int) -> int:
    """The fewest tokens that hold ``count`` different windows of ``width`` tokens (and one more token)."""
    return max(width + 1, count + width - 1)


def split_stream(
    stream: torch.Tensor, nsamples: int, held_out: int, seqlen: int, width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The token stream cut in two: a head for ``nsamples`` calibration windows and a tail for ``held_out``
    windows (of ``width`` text tokens, default ``seqlen``), sharing no token.

    The tail gets the share held_out / (nsamples + held_out) of the tokens, kept within what each part needs
    to hold its windows; a stream shorter than both parts' needs is a UserError naming how many tokens they need.
    """
    width = seqlen if width is None else width
    total, head_need, tail_need = stream.numel(), _tokens_for(nsamples, width), _tokens_for(held_out, width)
    if total < head_need + tail_need:
        raise UserError(
            f"the calibration text has {total} tokens; {nsamples} calibration windows and {held_out} held-out "
            f"windows of {seqlen} tokens, cut from parts of the text that share no token, need at least "
            f"{head_need + tail_need} tokens (and far more to draw them at varied places); give more text, or "
            "fewer windows (nsamples, held_out), or a smaller seqlen",
            param=("nsamples", "held_out", "seqlen"),
        )
    share = round(total * held_out / (nsamples + held_out))
    tail = min(max(share, tail_need), total - head_need)
    return stream[: total - tail], stream[total - tail :]


def check_window_request(nsamples: int, seqlen: int) -> None:
    """Refuse non-positive window counts, and more windows than memory can hold, before anything is allocated
    (the ids alone take 8 bytes a token; calibration then keeps hidden states of every window)."""
    if nsamples <= 0 or seqlen <= 0:
        raise UserError(
            f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}", param=("nsamples", "seqlen")
        )
    import psutil

    available = psutil.virtual_memory().available
    if nsamples * seqlen * 8 > available // 4:
        raise UserError(
            f"nsamples × seqlen = {nsamples * seqlen:,} tokens do not fit this machine's memory "
            f"({available / 2**30:.1f} GiB available); a few hundred windows are plenty for calibration",
            param=("nsamples", "seqlen"),
        )


def eval_windows(
    tokenizer, text: str, seqlen: int, *, bos: bool | None = None, vocab_size: int | None = None
) -> torch.Tensor:
    """Non-overlapping windows of ``seqlen`` tokens over the whole tokenized text (the tail is dropped).

    ``bos`` (default: :func:`wants_bos`): each window is the BOS token followed by the next ``seqlen − 1``
    tokens of the text (as llama.cpp's perplexity does), so every text token is predicted once, always with
    BOS first. ``vocab_size``: the model's embedding rows, checked against every token id of the text.
    """
    bos = _bos_setting(tokenizer, bos)
    ids = _tokenize(tokenizer, text)
    check_token_ids(ids, vocab_size)
    stream, width = _stream(tokenizer, ids, bos), seqlen - int(bos)
    n = stream.numel() // width if width > 0 else 0
    if n == 0:
        raise UserError(f"evaluation text has {ids.numel()} tokens, fewer than one window of {seqlen}")
    rows = stream[: n * width].reshape(n, width)
    return _with_bos(tokenizer, rows) if bos else rows


def windows_hash(windows: torch.Tensor) -> str:
    """SHA-256 of the token windows: identifies the exact calibration set in the recipe."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()


def tokenized_source(tokenizer, source: str) -> tuple[TextSource, torch.Tensor]:
    """The calibration text of ``source`` and its token ids (what :func:`draw` cuts windows from)."""
    text = load_text(source, role="calib")
    return text, _tokenize(tokenizer, text.text)


def draw(
    tokenizer,
    source: str,
    *,
    nsamples: int = 128,
    seqlen: int = 2048,
    seed: int = 0,
    prepared: tuple[TextSource, torch.Tensor] | None = None,
    bos: bool | None = None,
    vocab_size: int | None = None,
    held_out: int = 0,
):
    """Calibration windows ``[nsamples, seqlen]`` and a description of them for the recipe; ``prepared``: what
    :func:`tokenized_source` gives for ``source`` with this tokenizer (tokenized meanwhile elsewhere). ``bos``,
    ``vocab_size``, ``held_out``: see :func:`calibration_windows` (``held_out`` windows follow the calibration
    windows, from a part of the text they do not touch); the recipe records whether windows start with BOS."""
    check_window_request(nsamples + held_out, seqlen)
    bos = _bos_setting(tokenizer, bos)
    text, ids = prepared if prepared is not None else (load_text(source, role="calib"), None)
    windows = calibration_windows(
        tokenizer, text.text, nsamples, seqlen, seed, ids=ids, bos=bos, vocab_size=vocab_size, held_out=held_out
    )
    info = {
        "source": text.description,
        "nsamples": nsamples,
        "seqlen": seqlen,
        "seed": seed,
        "bos": bos,
        "sha256": windows_hash(windows),
    }
    if held_out:
        info["held_out"] = held_out
    return windows, info
