"""Run metrics: tensorboard scalars and a JSONL line per record (rank 0), and the final summary."""
from __future__ import annotations

import json
import math
import time
from pathlib import Path
from typing import Optional


class MetricsLog:
    """Tensorboard scalars and a JSONL line per record, rank 0 only."""

    def __init__(self, out: Path, enabled: bool, truncate_to: Optional[int] = None,
                 purge_step: Optional[int] = None):
        """`truncate_to`: on a resume, the size metrics.jsonl had when the checkpoint was written;
        what a killed run logged after it is dropped (the resumed run logs those steps again).
        `purge_step`: tensorboard hides the killed run's events from that step on."""
        self.enabled = enabled
        self.t0 = time.perf_counter()
        self.tb = None
        self.jsonl = None
        if enabled:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(str(out / "tensorboard"), purge_step=purge_step)
            path = out / "metrics.jsonl"
            if truncate_to is not None and path.is_file() and path.stat().st_size > truncate_to:
                with open(path, "r+b") as f:
                    f.truncate(truncate_to)
            self.jsonl = open(path, "a")

    def size(self) -> int:
        """Bytes of metrics.jsonl written so far (stored in each checkpoint's run state)."""
        self.jsonl.flush()
        return self.jsonl.tell()

    def log(self, record: dict, step: int) -> None:
        if not self.enabled:
            return
        record = {**record, "elapsed_s": round(time.perf_counter() - self.t0, 3)}  # this process's clock
        for k, v in record.items():
            if isinstance(v, (int, float)) and k != "step":
                self.tb.add_scalar(k, v, step)
        self.jsonl.write(json.dumps(record) + "\n")
        self.jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self.tb.close()
            self.jsonl.close()


def format_summary(s: dict) -> str:
    lines = ["", "== dsgrow run summary ==",
             f"model         {s['family']}, {s['params'] / 1e6:.2f}M params, ZeRO-{s['zero_stage']}, "
             f"{s['world_size']} rank(s), {s['precision']}",
             f"train loss    {_num(s['train_loss'])}",
             f"val loss      {_num(s['val_loss'])}"
             + (f"  (ppl {math.exp(min(s['val_loss'], 50)):.1f})" if _finite(s['val_loss']) else ""),
             f"tokens        {s['tokens']:,} in {s['steps']} steps"
             + (f"  ({100 * s['budget_used']:.1f}% of the budget)" if "budget_used" in s else ""),
             f"FLOPs         {s['flops']:.3e}",
             f"tokens/s      {_num(s['tokens_per_s'], ',.0f')}",
             f"wall time     {s['wall_time_s']:.1f} s"]
    if "exported_to" in s:
        lines.append(f"HF model      {s['exported_to']}")
    return "\n".join(lines)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


def _num(x, fmt: str = ".4f") -> str:
    return format(x, fmt) if _finite(x) else "n/a"


def json_safe(x):
    """JSON has no NaN/inf: write them as null (a reader sees "no value", not a parse error)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x
