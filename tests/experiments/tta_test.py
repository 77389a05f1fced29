"""experiments/tta.py: the claims on hand-written numbers (each can hold, fail, or not run), and a smoke run."""

import json
import os

from experiments import tta
from experiments.claims.tta import check_claims
from tests.tta.conftest import fashion_data_dir, pretrained_run  # pylint: disable=unused-import


def _means(**by_setting):
  return {
      s: dict(zip(("source", "bn_adapt", "tent", "eata", "sar", "lame", "cotta", "rmt"), v))
      for s, v in by_setting.items()
  }


def test_claims_hold_fail_and_need_their_methods():
  holds = check_claims(
      _means(
          one_at_a_time=(0.5, 0.4, 0.3, 0.3, 0.3, 0.5, 0.35, 0.33),
          continual=(0.5, 0.4, 0.6, 0.3, 0.3, 0.5, 0.35, 0.3),
          mixed=(0.5, 0.4, 0.6, 0.5, 0.45, 0.5, 0.4, 0.4),
          mixed_bs1=(0.5, 0.9, 0.9, 0.9, 0.5, 0.5, 0.9, 0.9),
          non_iid=(0.5, 0.7, 0.6, 0.6, 0.6, 0.45, 0.6, 0.6),
      ),
      {"eata": 100, "tent": 640},
  )
  assert [ok for _, ok, _ in holds] == [True] * 6
  fails = check_claims(
      _means(
          one_at_a_time=(0.5, 0.6, 0.3, 0.32, 0.3, 0.5, 0.35, 0.3),
          continual=(0.5, 0.6, 0.3, 0.3, 0.3, 0.5, 0.5, 0.4),
          mixed=(0.5, 0.4, 0.4, 0.5, 0.45, 0.5, 0.4, 0.4),
          mixed_bs1=(0.5, 0.9, 0.9, 0.9, 0.6, 0.5, 0.9, 0.9),
          non_iid=(0.5, 0.4, 0.6, 0.6, 0.6, 0.55, 0.6, 0.6),
      ),
      {"eata": 700, "tent": 640},
  )
  assert [ok for _, ok, _ in fails] == [False] * 6
  assert "EATA 32.0% with 700 images" in fails[1][2]
  partial = check_claims({"one_at_a_time": {"source": 0.5, "bn_adapt": 0.4}}, {})
  assert [ok for _, ok, _ in partial] == [None] * 6


def test_smoke_run_writes_tables_plot_and_refusals(pretrained_run, fashion_data_dir, tmp_path):
  result = tta.run_experiment(
      str(tmp_path),
      pretrained=pretrained_run[0],
      data_dir=fashion_data_dir,
      num_images=8,
      batch_size=4,
      methods=["source", "bn_adapt"],
  )
  assert set(result["errors"]["one_at_a_time"]) == {"source", "bn_adapt"}
  assert set(result["errors"]["one_at_a_time"]["source"]) == set(tta.corruptions.CORRUPTIONS) | {"mean"}
  assert "bn_adapt" in result["refused"]["mixed_bs1"] and "source" in result["errors"]["mixed_bs1"]
  assert len(result["continual_online_error"]["source"]) == 12 * 2
  markdown = open(tmp_path / "tta.md", encoding="utf-8").read()
  assert "| source | " in markdown and "bn_adapt refused mixed_bs1" in markdown and "not run" in markdown
  assert json.load(open(tmp_path / "tta.json", encoding="utf-8"))["backward"] == result["backward"]
  assert os.path.getsize(tmp_path / "tta_continual.png") > 1000
