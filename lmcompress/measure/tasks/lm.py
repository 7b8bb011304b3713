"""The two things every task asks of a model: log-likelihood of a continuation, and greedy generation.

``LM`` bundles a causal model, its tokenizer and where to compute. Tasks only call ``loglikelihood`` and
``generate``, so a test can hand them a stub that answers from a table.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from lmcompress.calibration.data import check_token_ids, embedding_rows
from lmcompress.errors import UserError
from lmcompress.models.families import context_length


class LM:
    """A causal LM ready for scoring: batched log-likelihoods and greedy generation, both context-bounded."""

    def __init__(
        self,
        model: nn.Module,
        tokenizer,
        *,
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        max_length: int | None = None,
        progress: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.max_length = max_length or context_length(model.config) or 2048
        self.progress = progress
        self.prefix_id = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (self.prefix_id or 0)
        self.vocab_size = embedding_rows(model)

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` with the tokenizer's own special tokens (e.g. a LLaMA BOS), checked against
        the model's embedding."""
        ids = self.tokenizer(text, verbose=False)["input_ids"]
        check_token_ids(ids, self.vocab_size)
        return ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids, split from the tokenization of the joined string.

        Trailing whitespace of the context moves to the continuation, and the continuation's tokens are
        those of ``context + continuation`` after the context's own tokens (the lm-evaluation-harness
        convention). An empty context becomes the BOS (or EOS) token so that the first token is scored too.
        """
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context) if context else []
        if whole[: len(ctx)] != ctx:  # a merge across the boundary: fall back to separate encodings
            whole = ctx + self.tokenizer(continuation, add_special_tokens=False, verbose=False)["input_ids"]
        cont = whole[len(ctx) :]
        if not ctx:
            if self.prefix_id is None:
                raise UserError("an empty context needs a BOS or EOS token to start from; this tokenizer has none")
            ctx = [self.prefix_id]
        return ctx, cont

    @torch.no_grad()
    def loglikelihood(self, pairs: list[tuple[str, str]], desc: str = "scoring") -> list[tuple[float, bool, int]]:
        """For each ``(context, continuation)``: the summed log-probability of the continuation's tokens,
        whether each of them is the model's top choice (greedy), and how many tokens it has.

        Batched, longest first, right-padded (padding sits after every real token, so causal attention never
        sees it)."""
        encoded = [self.encode_pair(c, x) for c, x in pairs]
        order = sorted(range(len(encoded)), key=lambda i: -(len(encoded[i][0]) + len(encoded[i][1])))
        results: list[tuple[float, bool, int] | None] = [None] * len(encoded)
        home = next(self.model.parameters()).device
        self.model.to(self.device)
        try:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            for batch in tqdm(batches, desc=desc, disable=not self.progress, unit="batch", leave=False):
                inputs, conts = [], []
                for i in batch:
                    ctx, cont = encoded[i]
                    cont = cont[-self.max_length :]  # a continuation longer than the context window: keep its end
                    seq = (ctx + cont)[-(self.max_length + 1) :]
                    inputs.append(seq[:-1])
                    conts.append(cont)
                width = max(len(s) for s in inputs)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, seq in enumerate(inputs):
                    ids[j, : len(seq)] = torch.tensor(seq)
                    mask[j, : len(seq)] = 1
                logits = self.model(ids.to(self.device), attention_mask=mask.to(self.device), use_cache=False).logits
                for j, i in enumerate(batch):
                    n, cont = len(inputs[j]), torch.tensor(conts[j], device=logits.device)
                    logp = F.log_softmax(logits[j, n - len(conts[j]) : n].float(), dim=-1)
                    token_lp = logp.gather(-1, cont[:, None]).squeeze(-1)
                    results[i] = (token_lp.sum().item(), bool((logp.argmax(-1) == cont).all()), len(conts[j]))
        finally:
            self.model.to(home)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def generate(
        self, prompts: list[str], *, max_new_tokens: int = 32, stop: str = "\n", desc: str = "generating"
    ) -> list[str]:
        """Greedy continuation of each prompt, cut at the first ``stop`` string (which is not returned).

        Prompts are batched (similar lengths together, left-padded) through the model's own ``generate``; a row
        is finished at ``stop`` or EOS. Each prompt keeps its last ``max_length - max_new_tokens`` tokens so
        that the answer fits in the context.
        """
        from transformers import StoppingCriteriaList

        encoded = [self.encode(p)[-max(1, self.max_length - max_new_tokens) :] for p in prompts]
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]))
        outputs: list[str | None] = [None] * len(encoded)
        home = next(self.model.parameters()).device
        self.model.to(self.device)
        try:
            batches = [order[i : i + self.batch_size] for i in range(0, len(order), self.batch_size)]
            for batch in tqdm(batches, desc=desc, disable=not self.progress, unit="batch", leave=False):
                width = max(len(encoded[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for j, i in enumerate(batch):
                    ids[j, width - len(encoded[i]) :] = torch.tensor(encoded[i])
                    mask[j, width - len(encoded[i]) :] = 1
                out = self.model.generate(
                    input_ids=ids.to(self.device),
                    attention_mask=mask.to(self.device),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    num_beams=1,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.tokenizer.eos_token_id,
                    stopping_criteria=StoppingCriteriaList([_StopAt(self.tokenizer, width, stop)]) if stop else None,
                )
                for j, i in enumerate(batch):
                    text = self.tokenizer.decode(out[j, width:], skip_special_tokens=True)
                    outputs[i] = text.split(stop)[0] if stop else text
        finally:
            self.model.to(home)
        return outputs  # type: ignore[return-value]


class _StopAt:
    """Stopping criterion: a row is done once its new text contains ``stop``."""

    def __init__(self, tokenizer, start: int, stop: str) -> None:
        self.tokenizer, self.start, self.stop = tokenizer, start, stop

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        texts = self.tokenizer.batch_decode(input_ids[:, self.start :], skip_special_tokens=True)
        return torch.tensor([self.stop in t for t in texts], dtype=torch.bool, device=input_ids.device)
