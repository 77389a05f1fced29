"""launch/adapt.py's loop (jaxpeft.train.tta_loop) on the pretrained smoke ResNet: every method, bad input."""

import json
import shutil

import pytest

from configs import (
    tta_adanpc,
    tta_alpha_bn,
    tta_bn_adapt,
    tta_cafa,
    tta_cotta,
    tta_eata,
    tta_lame,
    tta_ostta,
    tta_rmt,
    tta_sar,
    tta_source,
    tta_tent,
    tta_unmix_tns,
)
from jaxpeft.train import tta_loop as adapt

CONFIGS = {
    "source": tta_source,
    "bn_adapt": tta_bn_adapt,
    "alpha_bn": tta_alpha_bn,
    "unmix_tns": tta_unmix_tns,
    "tent": tta_tent,
    "eata": tta_eata,
    "sar": tta_sar,
    "ostta": tta_ostta,
    "lame": tta_lame,
    "adanpc": tta_adanpc,
    "cafa": tta_cafa,
    "cotta": tta_cotta,
    "rmt": tta_rmt,
}


def _config(module, pretrained_run, fashion_data_dir, **stream):
  config = module.get_config("smoke")
  config.pretrained = pretrained_run[0]
  config.dataset.data_dir = fashion_data_dir
  config.stream.update(stream)
  return config


@pytest.mark.parametrize("method", list(CONFIGS))
def test_every_method_runs_and_logs_online_error(method, pretrained_run, fashion_data_dir, tmp_path):
  config = _config(
      CONFIGS[method], pretrained_run, fashion_data_dir, corruptions=("contrast", "jpeg"), setting="one_at_a_time"
  )
  result = adapt.adapt(config, str(tmp_path))
  lines = [json.loads(l) for l in open(tmp_path / "metrics.jsonl", encoding="utf-8")]
  assert [l["corruption"] for l in lines] == ["contrast"] * 2 + ["jpeg"] * 2
  assert all(0 <= l["error"] <= 1 for l in lines)
  saved = json.load(open(tmp_path / "results.json", encoding="utf-8"))
  assert saved["errors"]["mean"] == pytest.approx((saved["errors"]["contrast"] + saved["errors"]["jpeg"]) / 2)
  assert result["errors"] == saved["errors"]


def test_bad_inputs(pretrained_run, fashion_data_dir, tmp_path):
  with pytest.raises(ValueError, match="Unknown corruption 'fog'"):
    adapt.adapt(_config(tta_tent, pretrained_run, fashion_data_dir, corruptions=("fog",)), str(tmp_path))
  with pytest.raises(ValueError, match="bn_adapt .* got a batch of 1"):
    adapt.adapt(_config(tta_bn_adapt, pretrained_run, fashion_data_dir, batch_size=1), str(tmp_path))
  stripped = tmp_path / "no_stats"
  shutil.copytree(pretrained_run[0], stripped)
  shutil.rmtree(stripped / "export" / "model_state")
  config = _config(tta_tent, pretrained_run, fashion_data_dir)
  config.pretrained = str(stripped)
  with pytest.raises(ValueError, match="has no batch statistics .*batch_stats"):
    adapt.adapt(config, str(tmp_path / "out"))
  config.pretrained = str(tmp_path / "nothing")
  with pytest.raises(ValueError, match="is not a finished launch/train.py run"):
    adapt.adapt(config, str(tmp_path / "out"))
