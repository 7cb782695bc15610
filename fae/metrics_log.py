"""RUN/metrics.csv, continued by a resumed run.

`RunCSVLogger`: Lightning's CSVLogger, which deletes an existing metrics.csv when it starts in a
non-empty folder, made to append instead. A resumed run replays nothing twice: the rows of steps at or
after the first step it logs (written after the checkpoint it resumes from, before the interruption)
move to metrics-superseded-<time>.csv, so metrics.csv is one continuous record with each step once,
and no row is lost (all earlier rows, when a run that saved no checkpoint is started again in its
folder).
"""

from __future__ import annotations

import csv
import os
import time
from pathlib import Path

from lightning.fabric.loggers.csv_logs import _ExperimentWriter
from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from fae.runs import METRICS_NAME

assert _ExperimentWriter.NAME_METRICS_FILE == METRICS_NAME, "Lightning renamed its metrics file"


class AppendingWriter(ExperimentWriter):
    """Lightning's CSV writer that continues an existing metrics.csv; see the module docstring."""

    def __init__(self, log_dir: str, supersede_all: bool = False) -> None:
        self._superseded_checked = False
        self.supersede_all = supersede_all
        super().__init__(log_dir)
        if self._fs.isfile(self.metrics_file_path):
            with open(self.metrics_file_path, newline="") as f:
                self.metrics_keys = sorted(csv.DictReader(f).fieldnames or [])
        else:
            self._superseded_checked = True  # a new file: nothing to continue

    def _check_log_dir_exists(self) -> None:
        """Lightning deletes metrics.csv here; a run folder keeps it."""

    def save(self) -> None:
        if self.metrics and not self._superseded_checked:
            self._superseded_checked = True
            first = min(int(row["step"]) for row in self.metrics)
            self._move_superseded_rows(-(2**62) if self.supersede_all else first)
        super().save()

    def _move_superseded_rows(self, first_new_step: int) -> None:
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames or [], list(reader)
        later = [row.get("step") not in (None, "") and int(float(row["step"])) >= first_new_step for row in rows]
        if not any(later):
            return
        kept = [row for row, is_later in zip(rows, later, strict=True) if not is_later]
        moved = [row for row, is_later in zip(rows, later, strict=True) if is_later]
        superseded = Path(self.log_dir) / f"metrics-superseded-{time.strftime('%Y%m%d-%H%M%S')}.csv"
        for path, content in ((superseded, moved), (Path(self.metrics_file_path), kept)):
            partial = path.with_name(f".{path.name}.partial")
            with open(partial, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=header)
                writer.writeheader()
                writer.writerows(content)
            os.replace(partial, path)  # the superseded rows are safe before metrics.csv loses them


class RunCSVLogger(CSVLogger):
    """CSVLogger writing RUN/metrics.csv that a resumed run appends to; see the module docstring."""

    def __init__(self, run_dir: Path, supersede_all: bool = False) -> None:
        super().__init__(save_dir=run_dir, name="", version="")
        self.supersede_all = supersede_all

    @property
    @rank_zero_experiment
    def experiment(self) -> AppendingWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = AppendingWriter(log_dir=self.log_dir, supersede_all=self.supersede_all)
        return self._experiment
