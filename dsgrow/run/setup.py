"""What a run needs before its first step: the data (tokenizer and packed blocks, built once on
rank 0 and read from the cache elsewhere) and the checks that a resume or an `init_from` model
belongs to this recipe."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..config import ConfigError
from ..families.spec import ModelSpec
from ..recipe import Recipe

# Fields that may change when a run is resumed; anything else would silently train another run.
RESUMABLE_CHANGES = {"name", "out", "export_hf", "train.eval_every", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.log_every", "train.collective_timeout_s",
                     "train.stall_timeout_s"}


def cache_dir() -> Path:
    return Path(os.environ.get("DSGROW_CACHE_DIR", Path.home() / ".cache" / "dsgrow"))


@dataclass
class Data:
    tokenizer: object
    train: torch.Tensor
    val: torch.Tensor
    info: dict = field(default_factory=dict)


def prepare_data(recipe: Recipe, rank: int) -> Data:
    """Rank 0 trains the tokenizer and packs the blocks into the cache; the other ranks then read
    the cache. An error on rank 0 is sent to every rank so that all stop with the same line."""
    from ..data import build_blocks, load_documents, train_or_load_tokenizer
    from ..engine.runtime import barrier, broadcast_object

    d, t = recipe.data, recipe.train

    def build() -> Data:
        docs = load_documents(d.source, d.paths)
        tok = train_or_load_tokenizer(docs, d.vocab_size, cache_dir() / "tokenizers", model_type=d.tokenizer_type,
                                      seed=t.seed)
        train, val, info = build_blocks(docs, tok, t.seq_len, d.val_fraction, t.seed, cache_dir() / "blocks")
        return Data(tok, train, val, info)

    err, data = None, None
    if rank == 0:
        try:
            data = build()
        except (ValueError, FileNotFoundError) as e:
            err = f"{type(e).__name__}: {e}" if not isinstance(e, ValueError) else str(e)
    err = broadcast_object(err)
    if err:
        raise ConfigError(err)
    barrier()
    if data is None:
        data = build()  # a cache hit on every rank but 0
    need = t.eval_samples
    if len(data.val) < need:
        raise ConfigError(f"train.eval_samples ({need}) exceeds the validation split's {len(data.val)} blocks "
                          f"of {t.seq_len} tokens (lower it, or raise data.val_fraction)")
    return data


def data_fingerprint(data: Data) -> str:
    """sha256 of the token blocks the run trains and evaluates on: a corpus edited in place or a
    retrained tokenizer changes it, and a resume must not silently train on other data."""
    import hashlib

    h = hashlib.sha256()
    for t in (data.train, data.val):
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.contiguous().numpy().view("uint8").data)
    return h.hexdigest()


def check_resume_data(state: dict, tag: str, fingerprint: str) -> None:
    saved = state.get("data_fingerprint")
    if saved is not None and saved != fingerprint:
        raise ConfigError(f"--resume: the training data changed since checkpoint {tag} was written (token blocks "
                          f"{saved[:12]} then, {fingerprint[:12]} now): the corpus or its tokenizer was edited; "
                          "resume with the same data, or start a new run with train.init_from")


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


# Model fields added after checkpoints were already being written, with the value a checkpoint
# that lacks them was trained with: such a checkpoint resumes under a recipe that keeps the default.
ADDED_MODEL_FIELDS = {"parametrization": "sp", "base_hidden": None, "base_head_dim": None}


def _with_added_fields(saved: dict) -> dict:
    """A saved recipe with ADDED_MODEL_FIELDS filled into its `model` where it lacks them (stages
    keep the user's own partial model mappings, so only the recipe's model is complete)."""
    if not isinstance(saved.get("model"), dict):
        return saved
    return {**saved, "model": {**ADDED_MODEL_FIELDS, **saved["model"]}}


def check_resume_recipe(saved: dict, current: dict) -> None:
    a, b = _flat(_with_added_fields(saved)), _flat(current)
    for key in sorted(set(a) | set(b)):
        if key in RESUMABLE_CHANGES or key.startswith("model.vocab_size"):
            continue
        if a.get(key) != b.get(key):
            raise ConfigError(f"--resume: recipe field {key} is {b.get(key)!r} but the checkpoint was trained with "
                              f"{a.get(key)!r}")


def check_init_from(path: str, spec: ModelSpec) -> None:
    """train.init_from must hold exactly the recipe's model (vocabulary included)."""
    import transformers as tf

    from ..families.hf_io import check_weight_files

    check_weight_files(path)  # a truncated copy: one line now, not a traceback from transformers later
    theirs = ModelSpec.from_hf_config(tf.AutoConfig.from_pretrained(path, local_files_only=True))
    ours = ModelSpec.from_hf_config(spec.to_hf_config())  # defaults (ffn, eps, tying) made explicit
    if ours.mup and not theirs.mup:
        ours = ours.as_sp()  # an exported (folded) model: build_model unfolds it into the recipe's muP
    if theirs != ours:
        diff = {k: (v, ours.to_dict()[k]) for k, v in theirs.to_dict().items() if ours.to_dict().get(k) != v}
        raise ConfigError(f"train.init_from: {path} holds another model than the recipe's "
                          f"(field: theirs, recipe's) {diff}")
