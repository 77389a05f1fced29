"""Metric logging: metrics.jsonl, TensorBoard event files (tensorboardX, no TensorFlow) and a
console progress bar with step rate, loss and ETA. Only process 0 writes.

A resumed run's history reads as one clean run: on opening at `initial_step` (the restored
checkpoint's step), records of later steps (written before the run was killed) are dropped from
metrics.jsonl and purged from TensorBoard (`purge_step`), and a record for a (step, split) already
in the history is not written again (a rerun of a finished run re-evaluates the same state).
"""

import json
import math
import os
from typing import Any

import jax
import tensorboardX
import tqdm


class NonFiniteLossError(FloatingPointError):
  """Training produced a NaN or Inf loss or gradient norm."""


def check_finite(step: int, metrics: dict[str, float]) -> None:
  """Raises NonFiniteLossError naming the step and the metric that is NaN or Inf."""
  bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
  if bad:
    raise NonFiniteLossError(
        f"Non-finite training metrics at step {step}: {bad}. The run stopped; the last"
        " checkpoint was written before this step and is intact. Lower the learning rate,"
        " enable --config.optimizer.grad_clip_norm, or check the input data."
    )


class MetricWriter:
  """Writes scalars to `<workdir>/metrics.jsonl` and TensorBoard, and drives the progress bar."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, show_progress: bool = True):
    self._active = jax.process_index() == 0
    if not self._active:
      return
    path = os.path.join(workdir, "metrics.jsonl")
    self._written = set()
    kept = []
    if os.path.exists(path):
      with open(path, encoding="utf-8") as f:
        for line in f:
          try:
            record = json.loads(line)
          except json.JSONDecodeError:
            continue  # A line cut short by a kill.
          if record.get("step", 0) <= initial_step:
            kept.append(line if line.endswith("\n") else line + "\n")
            self._written.add((record.get("step"), record.get("split")))
      with open(path + ".tmp", "w", encoding="utf-8") as f:
        f.writelines(kept)
      os.replace(path + ".tmp", path)
    self._jsonl = open(path, "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, "tensorboard"), purge_step=initial_step + 1 if initial_step else None
    )
    self._bar = tqdm.tqdm(
        total=total_steps,
        initial=initial_step,
        unit="step",
        dynamic_ncols=True,
        disable=not show_progress,
        mininterval=1.0,
    )

  def write(self, step: int, split: str, scalars: dict[str, Any]) -> None:
    """Logs `scalars` for `split` ('train' or 'eval') at `step`."""
    if not self._active or (step, split) in self._written:
      return
    self._written.add((step, split))
    scalars = {k: float(v) for k, v in scalars.items()}
    self._jsonl.write(json.dumps({"step": step, "split": split, **scalars}) + "\n")
    self._jsonl.flush()
    for k, v in scalars.items():
      self._tb.add_scalar(f"{split}/{k}", v, step)
    self._tb.flush()
    if split == "train":
      self._bar.set_postfix({k: f"{v:.4g}" for k, v in scalars.items() if k in ("loss", "accuracy")})
    else:
      self._bar.write(f"step {step} {split}: " + ", ".join(f"{k}={v:.4f}" for k, v in scalars.items()))

  def advance(self, steps: int) -> None:
    if self._active:
      self._bar.update(steps)

  def close(self) -> None:
    if self._active:
      self._bar.close()
      self._jsonl.close()
      self._tb.close()
