"""Loss curves, validation Dice, throughput, ETA and memory (CSV and TensorBoard) and progress, written by rank 0.

    val_dice         mean Dice of the validation windows (training/validation.py), on the steps that validate
    seconds          this optimizer step's wall time (validation and checkpoints excluded)
    samples_per_s    samples of all ranks per second of that step
    eta_s            time left in the stage: the mean time of this process's steps so far, validations and
                     checkpoints included, times the steps left
    peak_memory_gib  the largest peak over the ranks: GPU memory allocated by tensors (torch.cuda.max_memory_allocated),
                     or on a CPU run the process's maximum resident set

After a resume the rows past the checkpoint are dropped from the CSV and TensorBoard purges its events past it,
so each curve shows every step once.
"""
from __future__ import annotations

import csv
import sys
from datetime import timedelta
from pathlib import Path

COLUMNS = ("step", "epoch", "samples", "loss", "loss_lm", "loss_dice", "loss_bce", "loss_align", "val_dice", "lr",
           "grad_norm", "seconds", "samples_per_s", "eta_s", "peak_memory_gib")
SCALARS = COLUMNS[3:]           # the TensorBoard curves, over the step


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
        for key in SCALARS:
            if values.get(key) is not None:
                self.tensorboard.add_scalar(f"stage{self.stage}/{key}", values[key], step)
        validated = values.get("val_dice") is not None
        self.bar.update(1)
        # The bar shows its own rate and ETA; the postfix adds the rest.
        postfix = {"loss": f"{values['loss']:.4f}", "samples/s": f"{values['samples_per_s']:.2f}",
                   "peak": f"{values['peak_memory_gib']:.2f} GiB"}
        if validated:
            postfix["val_dice"] = f"{values['val_dice']:.3f}"
        self.bar.set_postfix(postfix)
        if self.bar.disable and (step % self.log_every == 0 or step == self.total_steps or validated):
            validation = f" val_dice {values['val_dice']:.4f}" if validated else ""
            print(f"[stage {self.stage}] step {step}/{self.total_steps} loss {values['loss']:.4f} "
                  f"(lm {values['loss_lm']:.4f} dice {values['loss_dice']:.4f} bce {values['loss_bce']:.4f} "
                  f"align {values['loss_align']:.4f})"
                  f"{validation} lr {values['lr']:.2e} {values['seconds']:.2f} s/step "
                  f"{values['samples_per_s']:.2f} samples/s ETA {timedelta(seconds=round(values['eta_s']))} "
                  f"peak {values['peak_memory_gib']:.2f} GiB", flush=True)

    def close(self) -> None:
        self.tensorboard.close()
        self.bar.close()
