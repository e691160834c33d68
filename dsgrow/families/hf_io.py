"""Building, loading and saving the Hugging Face models behind a canonical dict.

Everything here stays local: configs and weights come from directories on disk
(local_files_only), and saved directories load with plain `transformers`, no dsgrow import.
"""
from __future__ import annotations

import fnmatch
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from . import mup
from .canonical import from_canonical, to_canonical, validate_canonical
from .spec import ModelSpec, SpecError

# Files a tokenizer directory may hold that save_hf_dir copies next to the model.
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab.*",
                   "merges.txt", "*.model", "chat_template.*")


def hf_model_class(spec: ModelSpec):
    import transformers as tf

    return tf.AutoModelForMaskedLM if spec.family == "bert" else tf.AutoModelForCausalLM


def build_hf_model(spec: ModelSpec, seed: Optional[int] = None) -> torch.nn.Module:
    """A freshly initialised fp32 HF model of `spec`, in eval mode.

    With `seed`, the init is reproducible and the caller's global RNG state is left untouched.
    """
    cfg = spec.to_hf_config()
    with torch.random.fork_rng(devices=[]):
        if seed is not None:
            torch.manual_seed(seed)
        model = hf_model_class(spec).from_config(cfg, dtype=torch.float32)
        mup.prepare(model, fresh=True)
    return model.float().eval()


def _model_from_canonical(spec: ModelSpec, canonical: dict) -> torch.nn.Module:
    model = build_hf_model(spec)
    model.load_state_dict(from_canonical(spec, canonical), strict=True)
    return model


def logits(spec: ModelSpec, canonical: dict, input_ids: torch.Tensor,
           attention_mask: Optional[torch.Tensor] = None,
           token_type_ids: Optional[torch.Tensor] = None) -> torch.Tensor:
    """fp32 logits [B, T, V] of the canonical model (builds a fresh HF model each call)."""
    if token_type_ids is not None and spec.family != "bert":
        raise SpecError(f"token_type_ids: only bert has token types, not {spec.family}")
    model = _model_from_canonical(spec, canonical)
    kwargs = {"attention_mask": attention_mask}
    if spec.family == "bert":
        kwargs["token_type_ids"] = token_type_ids
    with torch.no_grad():
        return model(input_ids=input_ids, **kwargs).logits.float()


def _unreadable(file, e: Exception) -> SpecError:
    return SpecError(f"{file}: not a readable safetensors file ({e}): truncated or corrupt")


def _load_safetensors(file: str) -> dict:
    """A safetensors file's tensors, or one SpecError line for a truncated or damaged one."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(file)
    except SafetensorError as e:
        raise _unreadable(file, e) from None


def check_weight_files(path: str) -> None:
    """Every safetensors file of an HF model folder has an intact header that covers the file
    (what a truncated copy fails); reads headers only, no tensors."""
    from safetensors import SafetensorError, safe_open

    for file in sorted(Path(path).glob("*.safetensors")):
        try:
            with safe_open(str(file), "pt") as f:
                f.keys()
        except SafetensorError as e:
            raise _unreadable(file, e) from None


def _read_weights(path: str) -> dict:
    st_file = os.path.join(path, "model.safetensors")
    st_index = os.path.join(path, "model.safetensors.index.json")
    pt_file = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st_file):
        return _load_safetensors(st_file)
    if os.path.isfile(st_index):
        with open(st_index) as f:
            shards = sorted(set(json.load(f)["weight_map"].values()))
        sd = {}
        for shard in shards:
            shard_path = os.path.join(path, shard)
            if not os.path.isfile(shard_path):
                raise FileNotFoundError(f"{shard_path}: shard listed in {st_index} is missing")
            sd.update(_load_safetensors(shard_path))
        return sd
    if os.path.isfile(pt_file):
        # weights_only: a pickle from disk must not be able to run code.
        return torch.load(pt_file, map_location="cpu", weights_only=True)
    raise FileNotFoundError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def load_hf_dir(path: str | os.PathLike) -> tuple[ModelSpec, dict]:
    """(spec, canonical) of a local HF model directory (config.json + safetensors weights)."""
    import transformers as tf

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"{path}: Hugging Face model directory not found")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{os.path.join(path, 'config.json')}: not found")
    cfg = tf.AutoConfig.from_pretrained(path, local_files_only=True)
    spec = ModelSpec.from_hf_config(cfg)
    return spec, to_canonical(spec, _read_weights(path))


def save_hf_dir(spec: ModelSpec, canonical: dict, path: str | os.PathLike,
                tokenizer_dir: Optional[str | os.PathLike] = None) -> str:
    """Write `canonical` as a plain HF model directory at `path`; returns the path.

    The directory is assembled under ``path.tmp-<pid>`` and only then swapped in, so an existing
    `path` is replaced only by a complete new one (if the process dies between the two renames,
    the old copy survives as ``path.old-<pid>``).
    """
    validate_canonical(spec, canonical)
    # A muP model is written as the SP model with the same logits: plain transformers has no muP.
    spec, canonical = mup.fold(spec, canonical)
    path = os.path.normpath(os.fspath(path))
    tok_files = []
    if tokenizer_dir is not None:
        tokenizer_dir = os.fspath(tokenizer_dir)
        if not os.path.isdir(tokenizer_dir):
            raise FileNotFoundError(f"{tokenizer_dir}: tokenizer directory not found")
        tok_files = sorted(n for n in os.listdir(tokenizer_dir)
                           if os.path.isfile(os.path.join(tokenizer_dir, n))
                           and any(fnmatch.fnmatch(n, pat) for pat in TOKENIZER_FILES))
        if not tok_files:
            raise FileNotFoundError(f"{tokenizer_dir}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")

    model = _model_from_canonical(spec, canonical)
    tmp, old = f"{path}.tmp-{os.getpid()}", f"{path}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    try:
        # transformers 5 always writes safetensors (it dropped the safe_serialization flag).
        model.save_pretrained(tmp)
        if not (os.path.isfile(os.path.join(tmp, "model.safetensors"))
                or os.path.isfile(os.path.join(tmp, "model.safetensors.index.json"))):
            raise RuntimeError(f"{tmp}: save_pretrained wrote no safetensors weights")
        for name in tok_files:
            shutil.copy2(os.path.join(tokenizer_dir, name), os.path.join(tmp, name))
        if os.path.lexists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.isdir(old):
        shutil.rmtree(old)
    elif os.path.lexists(old):
        os.remove(old)
    return path
