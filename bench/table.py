"""The ratio rows every bench returns, and the one table `bench/run_all.py` prints."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Ratio:
    """`numerator / denominator`, both measured in the same run: e.g. ours 120 samples/s against theirs 100."""

    bench: str
    compared: str  # "ours-cache / open_clip (samples/s)"
    numerator: float
    denominator: float
    unit: str  # of both values: "samples/s", "s/step", "TFLOP/s"

    @property
    def ratio(self) -> float:
        return self.numerator / self.denominator


@dataclass(frozen=True)
class Note:
    """A bench that gave no ratio, and why (its dependency is missing, it failed, it needs a GPU)."""

    bench: str
    compared: str
    reason: str


def _value(value: float, unit: str) -> str:
    return f"{value:.3g} {unit}" if abs(value) < 100 else f"{value:,.0f} {unit}"


def format_table(rows: list[Ratio | Note]) -> str:
    """A markdown table: bench, what is compared, the ratio, and the two measured values."""
    lines = ["| bench | compared | ratio | numerator | denominator |", "|---|---|---:|---:|---:|"]
    for row in rows:
        if isinstance(row, Note):
            lines.append(f"| {row.bench} | {row.compared} | - | {row.reason} | |")
        else:
            lines.append(f"| {row.bench} | {row.compared} | {row.ratio:.2f}x | {_value(row.numerator, row.unit)} | "
                         f"{_value(row.denominator, row.unit)} |")
    return "\n".join(lines)
