"""What one growth of a live engine did: the typed report `dsgrow.grow_engine` returns.

Pure data (no torch, no DeepSpeed): the trainer logs it as a metrics event, a user's loop can
print it or keep it. Times are the slowest rank's; memory is every rank's (index = rank).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Optional


@dataclass
class PhaseReport:
    """One phase of a growth (gather, fit, write, engine, optimizer)."""

    seconds: float
    """Wall time of the slowest rank."""
    host_start_mib: list[float]
    host_peak_mib: list[float]
    """Peak resident memory of the phase, per rank (VmHWM reset at the phase start; see dsgrow.memory)."""
    host_file_end_mib: Optional[list[float]] = None
    """Of the resident memory at the phase end, file-backed pages (library code), per rank."""
    gpu_peak_mib: Optional[list[float]] = None
    """Peak allocated accelerator memory, per rank (GPU runs only)."""


@dataclass
class GrowthReport:
    method: str
    small: dict
    """ModelSpec of the model before (as a dict)."""
    large: dict
    optimizer: str
    """"reset" or "transfer"."""
    world_size: int
    phases: dict[str, PhaseReport] = field(default_factory=dict)
    growth_s: float = 0.0
    """Call to return, slowest rank."""
    fit_steps: int = 0
    fit_tokens: int = 0
    """Tokens the operator's fit consumed, all ranks together."""
    fit_flops: float = 0.0
    """FLOPs of the fit, all ranks together, measured (large forward + backward + operator)."""
    fit_losses: list[float] = field(default_factory=list)
    loss_before: Optional[float] = None
    """Loss of the old engine on `eval_batch` (rank mean), when one was given."""
    loss_after: Optional[float] = None
    """Loss of the new engine on the same batch."""
    bytes_gathered: int = 0
    elements_written: int = 0
    """Weight elements this rank wrote into the new model (its ZeRO-3 slice, or all)."""
    largest_layer_bytes: int = 0
    operator_bytes: Optional[int] = None
    adam_step: Optional[int] = None
    """With optimizer="transfer": Adam's step count, as the new engine's optimizer state holds it."""
    moments_written: Optional[int] = None
    host_base_mib: list[float] = field(default_factory=list)
    """Per rank, resident memory with no engine alive (after the old one was freed)."""
    host_base_file_mib: Optional[list[float]] = None
    carried: list[str] = field(default_factory=list)
    """What the new engine took over from the old one."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_event(self) -> dict:
        """The flat record dsgrow's trainer logs (metrics.jsonl `event: growth`)."""
        ev = {"method": self.method, "bytes_gathered": self.bytes_gathered, "elements_written": self.elements_written,
              "largest_layer_bytes": self.largest_layer_bytes, "host_base_mib": self.host_base_mib,
              "fit_tokens": self.fit_tokens, "fit_flops": self.fit_flops, "growth_s": self.growth_s}
        if self.host_base_file_mib is not None:
            ev["host_base_file_mib"] = self.host_base_file_mib
        if self.fit_losses:
            ev.update(fit_loss_first=self.fit_losses[0], fit_loss_last=self.fit_losses[-1])
        for k in ("operator_bytes", "adam_step", "moments_written"):
            if getattr(self, k) is not None:
                ev[k] = getattr(self, k)
        ev["memory_mib"] = {}
        for name, ph in self.phases.items():
            ev[f"{name}_s"] = ph.seconds
            ev["memory_mib"][name] = {k[:-4]: getattr(ph, k) for k in
                                      ("host_start_mib", "host_peak_mib", "host_file_end_mib", "gpu_peak_mib")
                                      if getattr(ph, k) is not None}
        return ev

    def summary(self) -> str:
        s, l = self.small, self.large
        line = (f"grew {s['layers']}x{s['hidden']} -> {l['layers']}x{l['hidden']} ({self.method}, optimizer "
                f"{self.optimizer}) in {self.growth_s:.2f} s")
        if self.fit_steps:
            line += f", fit {self.fit_steps} steps / {self.fit_tokens:,} tokens / {self.fit_flops:.3e} FLOPs"
        if self.loss_before is not None and self.loss_after is not None:
            line += f", loss {self.loss_before:.4f} -> {self.loss_after:.4f}"
        return line


def merge_phases(per_rank: list[dict]) -> dict[str, PhaseReport]:
    """Phases as each rank measured them (dsgrow.memory.phase records) -> one PhaseReport each."""
    out = {}
    for name in per_rank[0]:
        recs = [r[name] for r in per_rank]

        def col(key: str):
            vals = [r.get(key) for r in recs]
            return None if any(v is None for v in vals) else vals

        out[name] = PhaseReport(seconds=max(r["s"] for r in recs), host_start_mib=col("host_start_mib"),
                                host_peak_mib=col("host_peak_mib"), host_file_end_mib=col("host_file_end_mib"),
                                gpu_peak_mib=col("gpu_peak_mib"))
    return out


__all__ = ["GrowthReport", "PhaseReport", "merge_phases"]
