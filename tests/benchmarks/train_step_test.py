"""Smoke test of benchmarks/train_step.py: persistent workers in rotation, a table with paired ratios."""

import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_tiny_lora_table_has_times_quartiles_paired_ratio_and_load():
  env = {**os.environ, "XLA_FLAGS": "", "PYTHONPATH": ROOT}
  out = subprocess.run(
      [sys.executable, "-m", "benchmarks.train_step", "--size=tiny", "--rounds=2", "--steps=2", "--variants=lora"],
      cwd=ROOT,
      env=env,
      check=True,
      capture_output=True,
      text=True,
  ).stdout
  assert re.search(r"load average [\d.]+ [\d.]+ [\d.]+ before, [\d.]+ [\d.]+ [\d.]+ after", out), out
  number = r"[\d.]+"
  assert re.search(
      rf"\| lora \(jaxpeft\) \| {number} \[{number}, {number}\] \| {number} \[{number}, {number}\] \|", out
  ), out
  assert re.search(rf"\| lora \(PEFT\) \| {number} \[{number}, {number}\] \| — \|", out), out
