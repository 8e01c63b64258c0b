"""What a run leaves for people to read: summary.csv (timm's columns), log.jsonl and curves.png.

On resume both files are cut back to what the checkpoint had seen, so a run killed after writing a
row but before saving never shows that row twice.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from kzoo.train.checkpoint import atomic_write

SUMMARY, LOG, CURVES = "summary.csv", "log.jsonl", "curves.png"


class RunRecords:
    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.summary, self.log, self.curves = (self.run_dir / name for name in (SUMMARY, LOG, CURVES))

    def truncate(self, epochs_done: int, step: int) -> None:
        """Keep summary rows of finished epochs and log lines up to ``step``."""
        if self.summary.exists():
            rows = self.summary_rows()
            kept = [row for row in rows if int(row["epoch"]) < epochs_done]
            self._rewrite_summary(kept, list(rows[0].keys()) if rows else [])
        if self.log.exists():
            kept = [json.dumps(entry) for entry in self.log_entries() if entry.get("step", 0) <= step]
            atomic_write(self.log, lambda tmp: tmp.write_text("".join(f"{line}\n" for line in kept)))

    def log_entries(self) -> list[dict]:
        """The parsed log lines; a line cut short by a kill mid-write is dropped."""
        entries = []
        for line in self.log.read_text().splitlines() if self.log.exists() else []:
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return entries

    def summary_rows(self) -> list[dict[str, str]]:
        if not self.summary.exists():
            return []
        with open(self.summary, newline="") as f:
            return list(csv.DictReader(f))

    def _rewrite_summary(self, rows: list[dict], columns: list[str]) -> None:
        buffer = io.StringIO()
        if columns:
            writer = csv.DictWriter(buffer, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
        atomic_write(self.summary, lambda tmp: tmp.write_text(buffer.getvalue()))

    def add_summary(self, row: dict[str, float]) -> None:
        """One row per epoch: epoch, train_loss, eval_* and lr, as timm's update_summary writes."""
        rows = self.summary_rows()
        columns = list(rows[0].keys()) if rows else list(row.keys())
        self._rewrite_summary(rows + [{k: row.get(k, "") for k in columns}], columns)

    def add_log(self, entry: dict) -> None:
        with open(self.log, "a") as f:
            f.write(json.dumps(entry) + "\n")

    def plot(self) -> None:
        """Training loss per logged step, losses per epoch, and the eval metrics per epoch, as one PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps = [(e["step"], e["loss"]) for e in self.log_entries()
                 if isinstance(e.get("loss"), (int, float)) and math.isfinite(e["loss"])]
        rows = self.summary_rows()
        epochs = [int(r["epoch"]) for r in rows]
        figure, (step_axis, loss_axis, eval_axis) = plt.subplots(1, 3, figsize=(14, 3.8))
        if steps:
            step_axis.plot(*zip(*steps), lw=1)
        step_axis.set(title="training loss", xlabel="optimizer step")
        for column in ("train_loss", "eval_loss"):
            values = [r.get(column, "") for r in rows]
            if values and all(v != "" for v in values):
                loss_axis.plot(epochs, [float(v) for v in values], marker="o", label=column)
        loss_axis.set(title="loss per epoch", xlabel="epoch")
        for column in (c for c in (rows[0] if rows else {}) if c.startswith("eval_") and c != "eval_loss"):
            eval_axis.plot(epochs, [float(r[column]) for r in rows], marker="o", label=column)
        eval_axis.set(title="evaluation per epoch", xlabel="epoch")
        for axis in (loss_axis, eval_axis):
            if axis.get_legend_handles_labels()[0]:
                axis.legend()
        figure.tight_layout()
        atomic_write(self.curves, lambda tmp: figure.savefig(tmp, dpi=110, format="png"))
        plt.close(figure)
