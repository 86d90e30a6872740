"""Loss curves (CSV and TensorBoard) and progress, written by rank 0.

After a resume the rows past the checkpoint are dropped from the CSV and TensorBoard purges its events past it,
so each curve shows every step once.
"""
from __future__ import annotations

import csv
import sys
from pathlib import Path

COLUMNS = ("step", "epoch", "samples", "loss", "loss_lm", "loss_dice", "loss_bce", "lr", "grad_norm", "seconds")


class Logbook:
    def __init__(self, folder: Path, stage: int, start_step: int, total_steps: int, log_every: int):
        from torch.utils.tensorboard import SummaryWriter
        from tqdm import tqdm

        folder.mkdir(parents=True, exist_ok=True)
        self.stage, self.total_steps, self.log_every = stage, total_steps, log_every
        self.csv_path = folder / "metrics.csv"
        rows = self._rows_up_to(start_step)
        with self.csv_path.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, COLUMNS)
            writer.writeheader()
            writer.writerows(rows)
        self.tensorboard = SummaryWriter(str(folder / "tensorboard"), purge_step=start_step + 1)
        # A bar on a terminal; in a batch job's log, a plain line every `log_every` steps instead.
        self.bar = tqdm(total=total_steps, initial=start_step, desc=f"stage {stage}", unit="step",
                        disable=not sys.stderr.isatty())

    def _rows_up_to(self, step: int) -> list[dict]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="") as handle:
            return [row for row in csv.DictReader(handle) if int(row["step"]) <= step]

    def record(self, values: dict) -> None:
        row = {key: values.get(key, "") for key in COLUMNS}
        with self.csv_path.open("a", newline="") as handle:
            csv.DictWriter(handle, COLUMNS).writerow(row)
        step = values["step"]
        for key in COLUMNS[3:-1]:
            if values.get(key) is not None:
                self.tensorboard.add_scalar(f"stage{self.stage}/{key}", values[key], step)
        self.bar.update(1)
        self.bar.set_postfix(loss=f"{values['loss']:.4f}")
        if self.bar.disable and (step % self.log_every == 0 or step == self.total_steps):
            print(f"[stage {self.stage}] step {step}/{self.total_steps} loss {values['loss']:.4f} "
                  f"(lm {values['loss_lm']:.4f} dice {values['loss_dice']:.4f} bce {values['loss_bce']:.4f}) "
                  f"lr {values['lr']:.2e} {values['seconds']:.2f} s/step", flush=True)

    def close(self) -> None:
        self.tensorboard.close()
        self.bar.close()
