"""A sentencepiece tokenizer trained on the corpus, cached by content, exportable to HF transformers.

Ids are fixed so that every model family can rely on them:
  0 <pad>   first, so that zero-filled buffers and HF's usual padding_idx mean padding
  1 <unk>   2 <s> (bos)   3 </s> (eos; appended to every document when packing)
  4 <mask>  the masked-LM token, a control piece: only masking emits it, a literal "<mask>" in a
            text is text (as "<s>" is), which HF's split_special_tokens reproduces
  5 "\\n"   newlines are a piece of their own: the plays are verse and the line breaks carry it

Text is encoded line by line, each line with sentencepiece's dummy-prefix "▁", so the first word
of a line is tokenized like any other word (sentencepiece alone would glue it to the newline) and
decode(encode(text)) == text for any text whose characters are in the vocabulary (all text once
byte fallback is on). Normalization is "identity": no NFKC folding, whitespace kept as is.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import random
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Sequence

import sentencepiece as spm

from ..fileio import atomic_write_bytes, hf_offline
from .corpus import DataError, Document

PAD, UNK, BOS, EOS, MASK, NEWLINE = "<pad>", "<unk>", "<s>", "</s>", "<mask>", "\n"
MODEL_TYPES = ("bpe", "unigram")
# Bump when anything below changes what training produces, so stale cache entries are not reused.
TRAINING_FORMAT = "dsgrow-spm-1"
# Training reads at most this many lines: a few seconds on 2 cores for BPE (unigram is slower).
MAX_TRAINING_LINES = {"bpe": 400_000, "unigram": 50_000}
# Byte fallback spends 256 ids on raw bytes; below this size that would starve the merges.
BYTE_FALLBACK_MIN_VOCAB = 1024


class Tokenizer:
    """A trained sentencepiece model plus the line-by-line encoding described above."""

    def __init__(self, model_path: str | os.PathLike):
        self.model_path = str(model_path)
        self._load()

    def _load(self) -> None:
        try:
            self.sp = spm.SentencePieceProcessor(model_file=self.model_path)
        except (OSError, RuntimeError) as e:
            raise DataError(f"tokenizer: cannot load sentencepiece model {self.model_path} ({e})") from None
        ids = [self.sp.piece_to_id(p) for p in (PAD, UNK, BOS, EOS, MASK, NEWLINE)]
        if ids != list(range(6)):
            raise DataError(f"tokenizer: {self.model_path} was not trained by dsgrow (special ids {ids}, "
                            f"expected pad, unk, bos, eos, mask, newline = 0..5)")

    # Pickled by path: datasets' worker processes and DataLoader workers reopen the file.
    def __getstate__(self) -> dict:
        return {"model_path": self.model_path}

    def __setstate__(self, state: dict) -> None:
        self.model_path = state["model_path"]
        self._load()

    vocab_size = property(lambda self: self.sp.get_piece_size())
    pad_id = property(lambda self: 0)
    unk_id = property(lambda self: 1)
    bos_id = property(lambda self: 2)
    eos_id = property(lambda self: 3)
    mask_id = property(lambda self: 4)
    newline_id = property(lambda self: 5)

    @property
    def special_ids(self) -> tuple[int, ...]:
        """Ids that are structure, not text: never masked, never drawn as random replacements."""
        return (self.pad_id, self.bos_id, self.eos_id, self.mask_id)

    def encode(self, text: str) -> list[int]:
        return self.encode_batch([text])[0]

    def encode_batch(self, texts: Sequence[str], num_threads: int = 1) -> list[list[int]]:
        lines, counts = [], []
        for t in texts:
            parts = t.split("\n")
            lines.extend(parts)
            counts.append(len(parts))
        pieces = self.sp.encode(lines, num_threads=num_threads)
        out, k = [], 0
        for n in counts:
            ids = []
            for j in range(n):
                if j:
                    ids.append(self.newline_id)
                ids.extend(pieces[k + j])
            out.append(ids)
            k += n
        return out

    def decode(self, ids: Iterable[int]) -> str:
        lines, cur = [], []
        for i in ids:
            i = int(i)
            if i == self.newline_id:
                lines.append(cur)
                cur = []
            elif i not in (self.pad_id, self.bos_id, self.eos_id):
                cur.append(i)
        lines.append(cur)
        return "\n".join(self.sp.decode(line) for line in lines)

    def hf_backend(self):
        """The same tokenizer as a `tokenizers.Tokenizer` (the fast backend of transformers)."""
        from sentencepiece import sentencepiece_model_pb2 as pb
        from tokenizers import AddedToken, decoders, models, normalizers, pre_tokenizers
        from tokenizers import Tokenizer as HFTokenizer

        proto = pb.ModelProto()
        proto.ParseFromString(Path(self.model_path).read_bytes())
        spec = proto.trainer_spec
        if spec.model_type == pb.TrainerSpec.UNIGRAM:
            # One known difference: HF's lattice also matches control and byte pieces, so a text
            # holding a literal "<s>" or "<0x41>" encodes differently (sentencepiece never does).
            pieces = [(p.piece, p.score) for p in proto.pieces]
            model = models.Unigram(pieces, unk_id=self.unk_id, byte_fallback=spec.byte_fallback)
        else:
            model = models.BPE(*_bpe_vocab_and_merges(proto), unk_token=UNK, fuse_unk=True,
                               byte_fallback=spec.byte_fallback)
        tok = HFTokenizer(model)
        # The newline is split off before normalization (an added token with normalized=False);
        # each remaining line then gets its dummy prefix, exactly as encode_batch does.
        tok.normalizer = normalizers.Sequence([normalizers.Replace(" ", "▁"), normalizers.Prepend("▁")])
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
        steps = [decoders.Replace("▁", " ")]
        if spec.byte_fallback:
            steps.append(decoders.ByteFallback())
        # After fusing, drop the dummy prefix of the first line and of each line after a newline.
        steps += [decoders.Fuse(), decoders.Strip(" ", 1, 0), decoders.Replace("\n ", "\n")]
        tok.decoder = decoders.Sequence(steps)
        tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p in (PAD, UNK, BOS, EOS, MASK)])
        tok.add_tokens([AddedToken(NEWLINE, special=False, normalized=False)])
        return tok

    def save_hf(self, directory: str | os.PathLike) -> None:
        """Write tokenizer.json + tokenizer_config.json (+ the sentencepiece model as spm.model) so
        that transformers.AutoTokenizer.from_pretrained(directory) loads offline and encodes the
        same ids as encode() (no bos/eos is added: packing appends eos itself) and decodes to the
        same text (special pieces aside: pass skip_special_tokens=True)."""
        hf_offline(None)
        from transformers import PreTrainedTokenizerFast

        directory = Path(directory)
        hf = PreTrainedTokenizerFast(tokenizer_object=self.hf_backend(), pad_token=PAD, unk_token=UNK,
                                     bos_token=BOS, eos_token=EOS, mask_token=MASK,
                                     # "<s>" typed in a text is text to sentencepiece; keep HF alike.
                                     split_special_tokens=True)
        hf.save_pretrained(str(directory))
        shutil.copyfile(self.model_path, directory / "spm.model")

    def __repr__(self) -> str:
        return f"Tokenizer({self.model_path!r}, vocab_size={self.vocab_size})"


def _bpe_vocab_and_merges(proto) -> tuple[dict, list]:
    """Sentencepiece BPE keeps scored pieces, not merges. A piece's merge ranks by its score, which
    is how sentencepiece picks the next pair (the same recipe transformers uses for Llama)."""
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece for p in proto.pieces if p.type == p.NORMAL}
    merges = []
    for p in proto.pieces:
        if p.piece not in normal:
            continue
        splits = [(p.piece[:k], p.piece[k:]) for k in range(1, len(p.piece))
                  if p.piece[:k] in normal and p.piece[k:] in normal]
        merges += [(a, b, p.score) for a, b in sorted(splits, key=lambda s: (vocab[s[0]], vocab[s[1]]))]
    merges.sort(key=lambda m: (m[2], len(m[0]), len(m[1])), reverse=True)
    return vocab, [(a, b) for a, b, _ in merges]


def load_tokenizer(path: str | os.PathLike) -> Tokenizer:
    """A .model file, or a folder holding spm.model (written by save_hf) or tokenizer.model."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("spm.model", "tokenizer.model") if (p / n).is_file()]
        if not found:
            raise DataError(f"tokenizer: {p} holds neither spm.model nor tokenizer.model")
        p = found[0]
    elif not p.is_file():
        raise DataError(f"tokenizer: {p} does not exist")
    return Tokenizer(p)


def tokenizer_key(docs: Sequence[Document], vocab_size: int, model_type: str, seed: int) -> str:
    h = hashlib.sha256()
    h.update(json.dumps([TRAINING_FORMAT, spm.__version__, vocab_size, model_type, seed]).encode())
    for d in docs:
        h.update(len(d.text).to_bytes(8, "little"))  # length-prefixed: boundaries are part of the key
        h.update(d.text.encode("utf-8"))
    return h.hexdigest()[:20]


def _training_lines(docs: Sequence[Document], limit: int, seed: int) -> list[str]:
    lines = [line for d in docs for line in d.text.split("\n") if line.strip()]
    if len(lines) > limit:
        # Our own seeded sample rather than sentencepiece's shuffle, so the model is reproducible.
        keep = sorted(random.Random(seed).sample(range(len(lines)), limit))
        lines = [lines[i] for i in keep]
    return lines


def train_or_load_tokenizer(docs: Sequence[Document], vocab_size: int, cache_dir: str | os.PathLike,
                            model_type: str = "bpe", seed: int = 0) -> Tokenizer:
    """Train on the documents' lines, or load the model cached under the same content key."""
    if model_type not in MODEL_TYPES:
        raise DataError(f"data.tokenizer_type: {model_type!r} is not one of {', '.join(MODEL_TYPES)}")
    if vocab_size < 64:
        raise DataError(f"data.vocab_size must be >= 64, got {vocab_size}")
    if not docs:
        raise DataError("tokenizer: no documents to train on")
    path = Path(cache_dir) / f"spm-{model_type}-{vocab_size}-{tokenizer_key(docs, vocab_size, model_type, seed)}.model"
    if path.is_file():
        return Tokenizer(path)

    byte_fallback = vocab_size >= BYTE_FALLBACK_MIN_VOCAB
    buf = io.BytesIO()
    spm.set_random_generator_seed(seed)
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(_training_lines(docs, MAX_TRAINING_LINES[model_type], seed)),
            model_writer=buf, vocab_size=vocab_size, model_type=model_type,
            pad_id=0, unk_id=1, bos_id=2, eos_id=3, control_symbols=[MASK], user_defined_symbols=[NEWLINE],
            normalization_rule_name="identity", remove_extra_whitespaces=False, byte_fallback=byte_fallback,
            character_coverage=0.9995, input_sentence_size=0, shuffle_input_sentence=False,
            num_threads=min(2, os.cpu_count() or 1), minloglevel=2)
    except RuntimeError as e:
        # Chiefly "Vocabulary size too high" on a small corpus.
        msg = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise DataError(f"tokenizer: sentencepiece could not train vocab_size={vocab_size} ({model_type}) on "
                        f"{len(docs)} documents: {msg}") from None
    atomic_write_bytes(path, buf.getvalue())
    return Tokenizer(path)
