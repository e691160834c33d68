"""The small model as the grown model's draft: Hugging Face assisted generation
(`generate(..., assistant_model=draft)`), with the counts that say how well the draft did.

Greedy assisted generation returns exactly what the large model alone returns (the large model
verifies every drafted token); the draft only changes how many large-model forwards it takes.
Acceptance is measured from those forwards: each verification forward of the large model yields
its accepted draft tokens plus one of its own, so accepted = new tokens - large forwards, and
acceptance = accepted / drafted, drafted being the draft model's forwards (one per proposed
token). With sampling, transformers runs speculative sampling (a drafted token is accepted with
probability min(1, p/q)), whose output follows the large model's distribution.

`agreement` measures the same thing without generating: over held-out text, how often the
draft's greedy next token is the large model's (greedy acceptance per position) and the mean
sum_v min(p(v), q(v)) = 1 - TV(p, q) (speculative sampling's expected acceptance per token). Small
models' greedy continuations degenerate into loops that any draft predicts; real text does not.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Optional, Sequence

import torch

from ..data.corpus import DataError


def encode(tokenizer, text: str) -> list[int]:
    if hasattr(tokenizer, "encode_batch"):  # dsgrow's sentencepiece Tokenizer
        return tokenizer.encode(text)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids))


def eos_id(tokenizer) -> Optional[int]:
    return getattr(tokenizer, "eos_id", None) if hasattr(tokenizer, "encode_batch") else tokenizer.eos_token_id


@contextmanager
def counted(*models):
    """Count forward calls of each model (a list of ints, one per model)."""
    counts = [0] * len(models)
    hooks = []
    for i, m in enumerate(models):
        def hook(_mod, _args, _out, i=i):
            counts[i] += 1
        hooks.append(m.register_forward_hook(hook))
    try:
        yield counts
    finally:
        for h in hooks:
            h.remove()


def check_pair(model, draft) -> None:
    """A draft must speak the model's vocabulary (growth keeps it; an unrelated model may not)."""
    v1, v2 = model.config.vocab_size, draft.config.vocab_size
    if v1 != v2:
        raise DataError(f"draft: vocabulary of {v2} tokens, the model's has {v1} (a draft must share the tokenizer)")


@contextmanager
def draft_settings(draft, tokens: Optional[int], confidence: Optional[float]):
    """transformers reads the drafting schedule from the draft's generation_config: set it for
    one call and put it back. tokens: proposals per round (a constant schedule); confidence: the
    draft stops a round early when its top probability falls below this (0: never)."""
    gc = draft.generation_config
    old = (gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold)
    try:
        if tokens is not None:
            gc.num_assistant_tokens, gc.num_assistant_tokens_schedule = int(tokens), "constant"
        if confidence is not None:
            gc.assistant_confidence_threshold = float(confidence)
        yield
    finally:
        gc.num_assistant_tokens, gc.num_assistant_tokens_schedule, gc.assistant_confidence_threshold = old


def generate(model, tokenizer, prompts: Sequence[str], draft=None, max_new_tokens: int = 64,
             draft_tokens: Optional[int] = None, draft_confidence: Optional[float] = None,
             temperature: Optional[float] = None, seed: int = 0) -> dict:
    """Continuations of `prompts` (one at a time: assisted generation is batch size 1), exactly
    `max_new_tokens` each: greedy, or sampled at `temperature` (prompt i seeded with seed + i).
    Returns the texts and ids, wall time, tokens/s and, with a draft, the large / draft forward
    counts and the acceptance rate. draft_tokens / draft_confidence: see draft_settings (None:
    transformers' defaults)."""
    if temperature is not None and not temperature > 0:
        raise DataError(f"generate: temperature must be > 0, got {temperature}")
    if draft is not None:
        check_pair(model, draft)
        with draft_settings(draft, draft_tokens, draft_confidence):
            return _generate(model, tokenizer, prompts, draft, max_new_tokens, temperature, seed)
    return _generate(model, tokenizer, prompts, None, max_new_tokens, temperature, seed)


def agreement(model, draft, blocks: torch.Tensor, batch: int = 16) -> dict:
    """Teacher-forced on `blocks` (held-out text): the share of positions where the draft's argmax
    is the model's, and the mean of sum_v min(p, q) (speculative sampling's acceptance per token)."""
    check_pair(model, draft)
    match, accept, n = 0.0, 0.0, 0
    with torch.no_grad():
        for i in range(0, len(blocks), batch):
            ids = blocks[i:i + batch]
            p = torch.softmax(model(input_ids=ids).logits.float(), -1)
            q = torch.softmax(draft(input_ids=ids).logits.float(), -1)
            match += float((p.argmax(-1) == q.argmax(-1)).sum())
            accept += float(torch.minimum(p, q).sum(-1).sum())
            n += ids.numel()
    return {"greedy_match": match / n, "expected_acceptance": accept / n, "positions": n}


def _generate(model, tokenizer, prompts, draft, max_new_tokens: int, temperature: Optional[float],
              seed: int) -> dict:
    eos = eos_id(tokenizer)
    out_ids, texts = [], []
    new = 0
    with counted(model, *( [draft] if draft is not None else [])) as calls, torch.no_grad():
        start = time.perf_counter()
        for i, p in enumerate(prompts):
            ids = list(p) if isinstance(p, (list, tuple)) else encode(tokenizer, p)  # text, or token ids
            if not ids:
                raise DataError("generate: an empty prompt")
            x = torch.tensor([ids])
            kw = {"assistant_model": draft} if draft is not None else {}
            if temperature is not None:
                torch.manual_seed(seed + i)
                kw.update(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
            else:
                kw.update(do_sample=False)
            y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new_tokens,
                               min_new_tokens=max_new_tokens, pad_token_id=eos, use_cache=True,
                               **kw)
            gen = y[0, x.shape[1]:].tolist()
            new += len(gen)
            out_ids.append(gen)
            texts.append(decode(tokenizer, gen))
        seconds = time.perf_counter() - start
    res = {"texts": texts, "ids": out_ids, "new_tokens": new, "seconds": seconds, "tokens_per_s": new / seconds,
           "model_forwards": calls[0]}
    if draft is not None:
        drafted = calls[1]
        accepted = max(0, new - calls[0])
        res.update(draft_forwards=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else 0.0,
                   tokens_per_model_forward=new / calls[0])
    return res
