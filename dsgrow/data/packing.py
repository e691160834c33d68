"""Documents -> token ids -> fixed-length blocks, split by document, cached by content."""
from __future__ import annotations

import hashlib
import json
import os
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from .corpus import DataError, Document
from ..fileio import atomic_write_bytes, hf_offline
from .tokenizer import Tokenizer

# Bump when packing changes meaning, so stale cache entries are not reused.
PACKING_FORMAT = "dsgrow-blocks-1"


def split_documents(n_docs: int, val_fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """Indices of the train and validation documents, each list in corpus order. Held out by
    document, not by block, so no text of a validation play was ever trained on."""
    if not 0.0 < val_fraction < 1.0:
        raise DataError(f"data.val_fraction must be in (0, 1), got {val_fraction}")
    if n_docs < 2:
        raise DataError(f"data: {n_docs} document(s); a split by document needs at least 2")
    n_val = min(n_docs - 1, max(1, round(val_fraction * n_docs)))
    perm = torch.randperm(n_docs, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[n_val:]), sorted(perm[:n_val])


def _digest(*parts) -> str:
    h = hashlib.sha256()
    for p in parts:
        b = p if isinstance(p, bytes) else json.dumps(p).encode()
        h.update(len(b).to_bytes(8, "little"))
        h.update(b)
    return h.hexdigest()[:20]


def _encoder(tokenizer) -> tuple[Callable, int, bytes]:
    """(encode_batch, eos id, content key) of a dsgrow Tokenizer or of a transformers tokenizer
    (what `dsgrow grow` holds when it tokenizes a corpus for a saved model)."""
    if isinstance(tokenizer, Tokenizer):
        threads = min(2, os.cpu_count() or 1)
        return (partial(tokenizer.encode_batch, num_threads=threads), tokenizer.eos_id,
                Path(tokenizer.model_path).read_bytes())
    if getattr(tokenizer, "eos_token_id", None) is None:
        raise DataError(f"data: {type(tokenizer).__name__} is neither a dsgrow Tokenizer nor an HF tokenizer "
                        f"with an eos token")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    key = backend.to_str().encode() if backend is not None else repr(tokenizer).encode()
    return (lambda texts: tokenizer(list(texts), add_special_tokens=False)["input_ids"], tokenizer.eos_token_id,
            key)


def _encode_with_eos(batch: dict, encode: Callable, eos: int) -> dict:
    return {"ids": [x + [eos] for x in encode(batch["text"])]}


def tokenize_documents(docs: Sequence[Document], tokenizer, cache_dir: Optional[Path]) -> list[torch.Tensor]:
    """Each document's ids with eos appended, via a `datasets` map whose Arrow cache is keyed by
    content, so changing seq_len, the split or the seed re-packs without re-tokenizing. Without
    a cache_dir everything stays in memory."""
    encode, eos, tok_key = _encoder(tokenizer)
    hf_offline(cache_dir)
    from datasets import Dataset

    key = _digest(PACKING_FORMAT, tok_key, [d.text for d in docs])
    out = None
    if cache_dir is not None:
        out = cache_dir / "tokenized" / f"tok-{key}.arrow"
        out.parent.mkdir(parents=True, exist_ok=True)
    ds = Dataset.from_dict({"text": [d.text for d in docs]})
    # num_proc=1: sentencepiece's own threads parallelize without forking a process that may
    # already hold a torch.distributed group.
    ds = ds.map(_encode_with_eos, batched=True, batch_size=4, remove_columns=["text"], num_proc=1,
                fn_kwargs={"encode": encode, "eos": eos}, cache_file_name=str(out) if out else None,
                keep_in_memory=out is None, load_from_cache_file=True, new_fingerprint=key, desc="tokenizing")
    return [torch.as_tensor(ids, dtype=torch.long) for ids in ds.with_format("numpy")["ids"]]


def _pack(split: str, names: list[str], ids: list[torch.Tensor], seq_len: int) -> tuple[torch.Tensor, dict]:
    stream = torch.cat(ids) if ids else torch.zeros(0, dtype=torch.long)
    n_blocks = len(stream) // seq_len
    if n_blocks == 0:
        raise DataError(f"data: the {split} split ({len(names)} documents, {len(stream)} tokens) is shorter than "
                        f"one block of train.seq_len={seq_len} (add text, change data.val_fraction or lower seq_len)")
    # The tail shorter than a block is dropped rather than padded: every position is a real token.
    blocks = stream[: n_blocks * seq_len].view(n_blocks, seq_len).clone()
    return blocks, {"documents": names, "tokens": len(stream), "blocks": n_blocks,
                    "dropped_tokens": len(stream) - n_blocks * seq_len}


def build_blocks(docs: Sequence[Document], tokenizer, seq_len: int, val_fraction: float, seed: int,
                 cache_dir: Optional[str | os.PathLike]) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Train blocks [N, seq_len], validation blocks [M, seq_len] (int64) and an info dict.

    Each split is its documents' ids, each followed by eos, concatenated in corpus order and cut
    into non-overlapping blocks. `tokenizer` is a dsgrow Tokenizer (or an HF tokenizer). The
    result is cached as safetensors under a key of every input, so a second run, and every rank
    after the first, only reads a file; cache_dir=None computes in memory and writes nothing."""
    if seq_len < 1:
        raise DataError(f"train.seq_len must be >= 1, got {seq_len}")
    train_idx, val_idx = split_documents(len(docs), val_fraction, seed)
    path = None
    if cache_dir is not None:
        cache_dir = Path(cache_dir)
        key = _digest(PACKING_FORMAT, _encoder(tokenizer)[2], [[d.name, d.text] for d in docs], seq_len,
                      val_fraction, seed)
        path = cache_dir / f"blocks-{seq_len}-{key}.safetensors"
        if path.is_file():
            return _load(path)

    ids = tokenize_documents(docs, tokenizer, cache_dir)
    train, train_info = _pack("train", [docs[i].name for i in train_idx], [ids[i] for i in train_idx], seq_len)
    val, val_info = _pack("validation", [docs[i].name for i in val_idx], [ids[i] for i in val_idx], seq_len)
    info = {"seq_len": seq_len, "val_fraction": val_fraction, "seed": seed, "vocab_size": _vocab_size(tokenizer),
            "train": train_info, "val": val_info}
    if path is not None:
        _save(path, train, val, info)
    return train, val, {**info, "cache_file": str(path) if path else None, "from_cache": False}


def pack_all(docs: Sequence[Document], tokenizer, seq_len: int, cache_dir: Optional[str | os.PathLike]) -> torch.Tensor:
    """Every document packed into blocks [N, seq_len] as build_blocks packs a split (no hold-out)."""
    if seq_len < 1:
        raise DataError(f"seq_len must be >= 1, got {seq_len}")
    ids = tokenize_documents(docs, tokenizer, Path(cache_dir) if cache_dir is not None else None)
    return _pack("whole", [d.name for d in docs], ids, seq_len)[0]


def _vocab_size(tokenizer) -> int:
    return tokenizer.vocab_size if isinstance(tokenizer, Tokenizer) else len(tokenizer)


def _load(path: Path) -> tuple[torch.Tensor, torch.Tensor, dict]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        info = json.loads(f.metadata()["info"])
        train, val = f.get_tensor("train"), f.get_tensor("val")
    return train, val, {**info, "cache_file": str(path), "from_cache": True}


def _save(path: Path, train: torch.Tensor, val: torch.Tensor, info: dict) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({"train": train, "val": val}, metadata={"info": json.dumps(info)}))
