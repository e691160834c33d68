"""Multi-node launches on one machine: two "nodes" (one gloo rank each, 127.0.0.1 as master) train
the two-stage growth recipe under ZeRO-3 and must give the same weights as one node with 2 ranks;
the SLURM batch script runs for real under a SLURM-like environment with stand-ins for `srun` and
`scontrol`; bad hostfiles and batch sizes stop in the preflight with one line."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import REPO, free_port, run_launcher
from test_sharded_growth import staged
from test_train import final_weights, metrics, zero3_config

SBATCH = REPO / "launchers" / "slurm" / "pretrain.sbatch"
VENV = Path(sys.executable).parent.parent


def _env(**extra) -> dict:
    """This process's environment without anything a real launcher or SLURM would have set."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "DSGROW_MASTER", "DSGROW_NPROC", "DSGROW_LAUNCHER", "DSGROW_OUT",
                                "DSGROW_FAULT"))
           and k not in ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK", "CUDA_VISIBLE_DEVICES")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The recipe on one node with 2 ranks: what every multi-node run below must reproduce."""
    tmp = tmp_path_factory.mktemp("one_node")
    ds = zero3_config(tmp)
    out = tmp / "ref"
    run_launcher(["--ds_config", ds, "--out", str(out), *staged()], nproc=2)
    return {"ds": ds, "out": out, "weights": final_weights(out)}


def check_staged_run(out: Path, world: int = 2) -> None:
    """Both stages ran at `world` ranks under ZeRO-3, with one growth event, and the loss fell."""
    s = json.loads((out / "summary.json").read_text())
    assert s["world_size"] == world and s["zero_stage"] == 3, s
    ev = [m for m in metrics(out) if m.get("event") == "growth"]
    assert len(ev) == 1, ev
    vals = [m["val_loss"] for m in metrics(out) if "val_loss" in m]
    assert vals[-1] < vals[0] - 0.2, vals


# ---- 1. two nodes, one machine ------------------------------------------------------------------
def test_two_nodes_equal_one_node(tmp_path, reference):
    """torchrun --nnodes 2: two node processes, static rendezvous on 127.0.0.1, one rank each."""
    out = tmp_path / "two_nodes"
    port = free_port()
    procs = []
    for node in (0, 1):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node),
               "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port),
               str(REPO / "launchers" / "pretrain.py"), "--ds_config", reference["ds"], "--out", str(out),
               *staged()]
        log = open(tmp_path / f"node{node}.log", "w")
        procs.append((subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT), log))
    try:
        codes = [p.wait(timeout=300) for p, _ in procs]
    finally:
        for p, log in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
            log.close()
    logs = [(tmp_path / f"node{n}.log").read_text() for n in (0, 1)]
    assert codes == [0, 0], (codes, logs[0][-3000:], logs[1][-3000:])
    check_staged_run(out)
    # Same ranks, same data order, gloo's 2-rank reductions are order-fixed: measured 0.0.
    assert max_diff(final_weights(out), reference["weights"]) == 0.0


# ---- 2. the sbatch script, run by bash under a SLURM-like environment ---------------------------
FAKE_SRUN = """\
#!{python}
# Stand-in for srun inside an allocation: one task per node, all on this machine, concurrently;
# --kill-on-bad-exit=1 stops the other tasks when one fails. Exit status: the worst task's.
import os, signal, subprocess, sys, time
argv = sys.argv[1:]
with open({calls!r}, "a") as f:
    f.write(" ".join(argv) + "\\n")
nodes, kill = int(os.environ["SLURM_NNODES"]), False
while argv and argv[0].startswith("-"):
    a = argv.pop(0)
    if a.startswith("--nodes="):
        nodes = int(a.split("=", 1)[1])
    elif a == "--kill-on-bad-exit=1":
        kill = True
hosts = open({hosts!r}).read().split()
procs = []
for i in range(nodes):
    env = dict(os.environ, SLURM_PROCID=str(i), SLURM_NODEID=str(i), SLURM_LOCALID="0", SLURM_STEP_NUM_NODES=str(nodes),
               SLURM_STEP_NUM_TASKS=str(nodes), SLURMD_NODENAME=hosts[i])
    procs.append(subprocess.Popen(argv, env=env, start_new_session=True))
codes = [None] * nodes
while None in codes:
    for i, p in enumerate(procs):
        if codes[i] is None and p.poll() is not None:
            codes[i] = p.returncode if p.returncode >= 0 else 128 - p.returncode
            if codes[i] != 0 and kill:
                for q in procs:
                    if q.poll() is None:
                        os.killpg(q.pid, signal.SIGTERM)
    time.sleep(0.2)
sys.exit(max(codes))
"""

FAKE_SCONTROL = """\
#!/bin/bash
# Stand-in for `scontrol show hostnames NODELIST`: the node names of this fake allocation.
[[ "$1 $2" == "show hostnames" && "$3" == "$SLURM_JOB_NODELIST" ]] || {{ echo "fake scontrol: $*" >&2; exit 1; }}
tr ' ' '\\n' < {hosts!r}
"""


@pytest.fixture
def slurm(tmp_path):
    """A fake allocation: `srun`/`scontrol` on PATH, SLURM_* variables; returns a runner of the script."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    calls, hosts = tmp_path / "srun_calls.txt", tmp_path / "hosts.txt"
    (bin_dir / "srun").write_text(FAKE_SRUN.format(python=sys.executable, calls=str(calls), hosts=str(hosts)))
    (bin_dir / "scontrol").write_text(textwrap.dedent(FAKE_SCONTROL.format(hosts=str(hosts))))
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    job_id = _job_id_with_free_port()

    def run(args: list[str], node_names=("127.0.0.1", "localhost"), check: bool = True, **extra_env):
        hosts.write_text(" ".join(node_names))
        env = _env(PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID=str(job_id), SLURM_JOB_NAME="dsgrow",
                   SLURM_JOB_NODELIST=f"node[1-{len(node_names)}]", SLURM_NNODES=str(len(node_names)),
                   SLURM_SUBMIT_DIR=str(tmp_path), DSGROW_VENV=str(VENV), **extra_env)
        proc = subprocess.run(["bash", str(SBATCH), *args], cwd=tmp_path, env=env, capture_output=True, text=True,
                              timeout=400)
        if check and proc.returncode != 0:
            raise AssertionError(f"sbatch script failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
        return proc

    run.calls = calls
    run.port = 20000 + job_id % 20000
    return run


def _job_id_with_free_port() -> int:
    """A job id whose derived master port (20000 + id % 20000) is free on this machine."""
    for job_id in range(int.from_bytes(os.urandom(2), "little") + 100000, 10**7, 7919):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", 20000 + job_id % 20000))
                return job_id
            except OSError:
                continue
    raise RuntimeError("no free port")


def test_sbatch_script_runs_two_nodes_with_torchrun(tmp_path, reference, slurm):
    ds = tmp_path / "zero3.json"  # given relative to the submit folder, as a user would
    ds.write_text(Path(reference["ds"]).read_text())
    out = tmp_path / "runs" / "x"
    proc = slurm(["-", "zero3.json", *staged(), "--out", "runs/x"])
    log = proc.stdout + proc.stderr
    assert f"2 node(s) x 1 rank(s) = 2, torchrun, master 127.0.0.1:{slurm.port}" in log, log[-3000:]
    assert "dsgrow run summary" in log
    srun = slurm.calls.read_text().splitlines()
    assert len(srun) == 1 and "--kill-on-bad-exit=1" in srun[0] and "--nodes=2" in srun[0], srun
    check_staged_run(out)
    assert max_diff(final_weights(out), reference["weights"]) == 0.0  # measured 0.0
    logs = out / "logs"
    assert (logs / "launch.log").read_text().count("attempt 1") == 1
    for node in (0, 1):
        assert "torchrun, 1 rank(s)" in next(logs.glob(f"job*.node{node}.log")).read_text()
    assert (next(logs.glob("hostfile.*"))).read_text() == "127.0.0.1 slots=1\nlocalhost slots=1\n"


def test_sbatch_requeue_resumes_with_the_deepspeed_launcher(tmp_path, reference, slurm):
    """Killed at the end of stage 0 (both ranks, SIGKILL after the checkpoint commits), then the
    same command again, as SLURM does on a requeue: the script adds --resume by itself, the run
    grows and finishes, and the weights equal the uninterrupted one-node run's."""
    out = tmp_path / "shared" / "run"
    args = ["-", reference["ds"], *staged()]
    env = dict(DSGROW_LAUNCHER="deepspeed", DSGROW_OUT=str(out))
    first = slurm(args, check=False, DSGROW_FAULT="checkpoint_after_commit:stage0-end", **env)
    assert first.returncode != 0, first.stderr[-3000:]
    assert "failed (exit" in first.stderr and "resume" in first.stderr
    assert (out / "checkpoints" / "latest").read_text() == "stage0-end"
    assert not (out / "final_model").exists()
    # Requeued with a ds_config of another ZeRO stage (3 -> 2): DeepSpeed cannot re-shard that
    # (another world size it can, through a universal checkpoint); refused in the preflight,
    # before srun.
    other = ["-", str(REPO / "ds_configs" / "zero2.json"), *staged()]
    msg = one_line_error(slurm(other, check=False, **env))
    assert "keep the ZeRO stage" in msg, msg
    assert len(slurm.calls.read_text().splitlines()) == 1
    second = slurm(args, SLURM_RESTART_COUNT="1", **env)
    assert "resuming from stage0-end" in second.stderr, second.stderr[-3000:]
    launch = (out / "logs" / "launch.log").read_text().splitlines()
    starts = [line for line in launch if "attempt" in line]
    assert len(starts) == 2 and "deepspeed" in starts[1] and "attempt 2" in starts[1], launch
    cmdlines = [line for line in launch if line.startswith("  pretrain.py")]
    assert "--resume" not in cmdlines[0] and cmdlines[1].endswith("--resume"), cmdlines
    # DeepSpeed's launcher ran on each node with --no_ssh and its node rank.
    node1 = next((out / "logs").glob("job*.node1.log")).read_text()
    assert "node 1/2" in node1 and "deepspeed" in node1 and "--node_rank=1" in node1, node1[-2000:]
    check_staged_run(out)
    assert max_diff(final_weights(out), reference["weights"]) <= 1e-6


# ---- 3. bad input: one line, exit code 2, before any compute -----------------------------------
def preflight(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "dsgrow.multinode", *args], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=120)


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-2000:], proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("dsgrow: error:")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


SMALL_RUN = ["--set", "stages=null", "--set", "train.micro_batch=4", "--set", "train.global_batch=16",
             "--set", "train.eval_samples=32"]


def test_preflight_refuses_bad_hostfiles_and_batches(tmp_path):
    out = tmp_path / "out"
    run = [*SMALL_RUN, "--out", str(out)]
    hf = tmp_path / "hostfile"
    hf.write_text("127.0.0.1 slots=1\nno-such-node.invalid slots=1\n")
    msg = one_line_error(preflight("check", "--hostfile", str(hf), "--", *run))
    assert "no-such-node.invalid" in msg and "does not resolve" in msg and ":2:" in msg
    hf.write_text("# two nodes\nlocalhost slots=2\n127.0.0.1 slots=0\n")
    msg = one_line_error(preflight("check", "--hostfile", str(hf), "--", *run))
    assert "slots" in msg and ":3:" in msg
    hf.write_text("localhost slots=1\nlocalhost slots=1\n")
    assert "listed twice" in one_line_error(preflight("hostfile", str(hf)))
    hf.write_text("localhost 4\n")
    assert "HOST slots=N" in one_line_error(preflight("hostfile", str(hf)))
    hf.write_text("localhost slots=2\n127.0.0.1 slots=2\n")
    assert "4 slots" in one_line_error(preflight("check", "--hostfile", str(hf), "--world", "2", "--", *run))
    # 16 samples a step do not split into micro-batches of 4 over 3 ranks.
    msg = one_line_error(preflight("check", "--world", "3", "--", *run))
    assert "train.global_batch (16)" in msg and "(3)" in msg
    # A growth stage's own batch is checked too, not just the recipe's first one.
    stages = ("[{model: {layers: 2, hidden: 64, heads: 4}, tokens: 8192}, {grow: {method: fpi}, "
              "model: {layers: 4}, tokens: 8192, train: {global_batch: 24}}]")
    msg = one_line_error(preflight("check", "--world", "4", "--", *SMALL_RUN[2:], "--set", "train.tokens=null",
                                   "--set", f"stages={stages}"))
    assert "global_batch (24)" in msg
    one_line_error(preflight("check", "--world", "2", "--", *run, "--no_such_flag"))
    assert not out.exists()
    # What passes: the example hostfile's shape (its names are placeholders) and a good run.
    from dsgrow.multinode import parse_hostfile

    assert dict(parse_hostfile(str(REPO / "launchers" / "hostfile.example"), resolve=False)) == {
        "worker-1": 8, "worker-2": 8}
    hf.write_text("localhost slots=1 # first\n127.0.0.1 slots=1\n")
    ok = preflight("check", "--hostfile", str(hf), "--print-out", "--", *run)
    assert ok.returncode == 0 and ok.stdout.strip() == str(out), ok.stderr
    assert not out.exists()


def test_sbatch_script_stops_bad_input_before_srun(tmp_path, slurm):
    """The batch script's preflight: a batch that cannot split over 3 nodes, and a node name that
    does not resolve (deepspeed launcher mode); one line, exit code 2, srun never called, nothing
    written to the output folder."""
    out = tmp_path / "runs" / "bad"
    args = ["-", str(REPO / "ds_configs" / "zero2.json"), *SMALL_RUN]
    msg = one_line_error(slurm(args, node_names=("127.0.0.1", "localhost", "127.0.0.2"), check=False,
                               DSGROW_OUT=str(out), DSGROW_HOME=str(REPO)))
    assert "train.global_batch (16)" in msg and "(3)" in msg
    msg = one_line_error(slurm(args, node_names=("127.0.0.1", "no-such-node.invalid"), check=False,
                               DSGROW_LAUNCHER="deepspeed", DSGROW_OUT=str(out)))
    assert "no-such-node.invalid" in msg
    msg = one_line_error(slurm(args, check=False, DSGROW_LAUNCHER="mpi", DSGROW_OUT=str(out)))
    assert "DSGROW_LAUNCHER" in msg
    assert not slurm.calls.exists()
    assert not out.exists()
