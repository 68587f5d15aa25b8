"""Loggers: a CSV logger whose metrics file survives a resume.

Lightning's ``CSVLogger`` deletes an existing ``metrics.csv`` when it starts in that directory, and
writes its rows only every ``flush_logs_every_n_steps`` (100) steps. A run resumed with
``ckpt_path=last`` in its own run directory therefore loses the history before the checkpoint, and
a killed run loses up to 100 steps of rows. :class:`ResumableCSVLogger` keeps the file, writes every
row when it is logged, and, when the run continues, drops the rows that the killed process logged
after the checkpoint it resumes from (they are logged again by the resumed run).
"""

from __future__ import annotations

import csv
from typing import Any

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """``ExperimentWriter`` that continues an existing ``metrics.csv`` instead of deleting it.

    The first row logged decides what to keep: existing rows with a step below its step stay (the
    history before the checkpoint a resumed run starts from); rows at or after it are dropped (the
    killed run's rows after that checkpoint, or all of them for a new run from step 0).
    """

    def _check_log_dir_exists(self) -> None:
        self._continuing = self._fs.isfile(self.metrics_file_path)
        if self._continuing:
            with self._fs.open(self.metrics_file_path, "r", newline="") as f:
                self.metrics_keys = next(csv.reader(f), [])

    def log_metrics(self, metrics_dict: dict[str, float], step: int | None = None) -> None:
        if self._continuing:
            self._continuing = False
            self._keep_rows_before(step if step is not None else 0)
        super().log_metrics(metrics_dict, step)

    def _keep_rows_before(self, step: int) -> None:
        with self._fs.open(self.metrics_file_path, "r", newline="") as f:
            rows = [row for row in csv.DictReader(f) if row.get("step") and float(row["step"]) < step]
        with self._fs.open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=self.metrics_keys)
            writer.writeheader()
            writer.writerows(rows)


class ResumableCSVLogger(CSVLogger):
    """``CSVLogger`` for runs that may be killed and resumed in the same run directory.

    Rows go to ``<save_dir>/<name>/<version>/metrics.csv`` as with Lightning's ``CSVLogger``, but:

    - an existing ``metrics.csv`` is continued, not deleted: on a resume the rows logged before the
      checkpoint stay, those the killed run logged after it are replaced by the resumed run's;
    - every row is written when it is logged (``flush_logs_every_n_steps=1`` by default), so a
      killed run's file holds every step it finished.

    Args:
        save_dir, name, version, prefix, flush_logs_every_n_steps: as ``CSVLogger``.
    """

    def __init__(self, save_dir: str, name: str = "csv", version: int | str | None = "", prefix: str = "",
                 flush_logs_every_n_steps: int = 1, **kwargs: Any):
        super().__init__(save_dir, name=name, version=version, prefix=prefix,
                         flush_logs_every_n_steps=flush_logs_every_n_steps, **kwargs)

    @property
    @rank_zero_experiment
    def experiment(self) -> _ContinuingWriter:
        """The writer (rank zero only), created on first use."""
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(log_dir=self.log_dir)
        return self._experiment
