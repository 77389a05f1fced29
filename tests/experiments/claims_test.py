"""Tests of experiments/claims: each claim module in a tiny setting, and the results table."""

import numpy as np
import optax
import pytest

from experiments.claims.all_claims import CLAIMS
from experiments.claims import adabelief, adabound, adapters, adopt, came, mars, sharpness, swats, upgd
from experiments.claims.results import ClaimRow, markdown_table, results_markdown
from jaxpeft.optim.came import came as came_optimizer


def test_adopt_converges_where_adam_with_small_beta2_drifts():
  tx = {name: t for name, t in adopt.optimizers(0.9, 0.1, 0.01).items()}
  adam = adopt.simulate(tx["Adam"], k=10.0, num_steps=3000, num_runs=16, seed=0)
  ours = adopt.simulate(tx["ADOPT"], k=10.0, num_steps=3000, num_runs=16, seed=0)
  assert adam[-1] > 0.5  # drifted towards the wrong end, +1
  assert ours[-1] < -0.5  # towards the optimum, -1


def test_adopt_claim_row_and_plot(tmp_path, monkeypatch):
  small = adopt.get_config(True)
  small.update(num_steps=1500, num_runs=8, b2s=(0.1,))
  monkeypatch.setattr(adopt, "get_config", lambda _: small)
  (row,) = adopt.run(True, str(tmp_path))
  assert row.checks["Adam (b2=0.1) ends on the wrong side"]
  assert (tmp_path / "adopt.png").stat().st_size > 0


def test_adabound_rates_go_from_adam_spread_to_final_lr(tmp_path, monkeypatch):
  small = adabound.get_config(True)
  small.update(num_steps=2000)
  spread, clipped, deviation = adabound.effective_rates(small)
  assert spread[0] > 100 and clipped[0] < 0.5  # Adam-like: per-coordinate rates over decades
  # The band is [final_lr (1 - 1/(gamma t + 1)), final_lr (1 + 1/(gamma t))]: at t = 2000 every rate
  # is within 1/(gamma t) = 50% of final_lr, and the spread within (1 + 1/2) / (1 - 1/3) = 2.25.
  assert deviation[-1] <= 0.5 + 1e-5 and spread[-1] <= 2.25 + 1e-4
  monkeypatch.setattr(adabound, "get_config", lambda _: small)
  (row,) = adabound.run(True, str(tmp_path))
  assert list(row.checks.values())[0] and (tmp_path / "adabound.png").stat().st_size > 0


def test_came_state_is_smaller_than_adam():
  params = {"w": np.zeros((64, 32), np.float32), "b": np.zeros((32,), np.float32)}
  came_bytes = came.state_bytes_per_param(came_optimizer(1e-3).init(params), params)
  adam_bytes = came.state_bytes_per_param(optax.adam(1e-3).init(params), params)
  # Adam: two float32 moments (8 B) plus a step count; CAME: momentum (4 B) plus factored statistics.
  assert adam_bytes == pytest.approx(8.0, abs=0.01)
  assert came_bytes < 0.6 * adam_bytes


def test_sharpness_claim_compares_the_three_methods_with_the_base():
  assert list(sharpness.optimizers(sharpness.get_config(True))) == [sharpness.BASE, "SAM", "ASAM", "TRAM"]


def test_sharpness_of_random_directions_matches_a_closed_form():
  # For L(w) = |w|^2 / 2 at w = 0 the increase along any unit direction at radius r is r^2 / 2.
  directions = sharpness.random_directions({"w": np.zeros(5, np.float32)}, num=3, seed=0)
  for d in directions:
    np.testing.assert_allclose(np.linalg.norm(d["w"]), 1.0, rtol=1e-6)
    np.testing.assert_allclose(0.5 * np.sum((2.0 * d["w"]) ** 2), 2.0, rtol=1e-5)


def test_adabelief_trajectory_reaches_the_quadratic_minimum():
  f, start = adabelief.FUNCTIONS["(x+y)^2+(x-y)^2/10"]
  points = adabelief.trajectory(f, start, optax.sgd(0.05), 200)
  # Gradient descent on this quadratic contracts each eigen-direction by (1 - lr * eigenvalue).
  u, v = start[0] + start[1], start[0] - start[1]
  expected_v = v * (1 - 0.05 * 0.4) ** 200
  np.testing.assert_allclose(points[-1][0] - points[-1][1], expected_v, rtol=1e-3)
  np.testing.assert_allclose(points[-1][0] + points[-1][1], u * (1 - 0.05 * 4) ** 200, atol=1e-6)
  assert adabelief.steps_to_tolerance(np.array([3.0, 2.0, 0.5, 0.1]), 1.0) == 2
  assert adabelief.steps_to_tolerance(np.array([3.0]), 1.0) is None


def test_adapters_claim_is_wired_to_the_harness_configs():
  c = adapters.get_config(True)
  for method in adapters.METHODS:
    config = adapters.method_config(method, c)
    assert config.num_train_steps == c.num_train_steps and config.dataset.max_len == c.max_len
  assert adapters.method_config("nola", c).adapter.method == "nola"
  assert adapters.method_config("randlora", c).adapter.rank == 32
  assert adapters.method_config("full", c).adapter.method == ""


def test_verdict_rule_and_table_has_a_row_per_claim():
  rows = [
      ClaimRow("a", "p", "m", {"x": True}),
      ClaimRow("b", "p", "m", {"x": True, "y": False}),
      ClaimRow("c", "p | q", "m", {"x": False}),
  ]
  assert [r.verdict for r in rows] == ["yes", "partly", "no"]
  table = results_markdown(rows, "python experiments/run.py --small", {"a": 1.0})
  lines = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| claim")]
  assert [line.split(" | ")[0][2:] for line in lines] == ["a", "b", "c"]
  assert "partly (fails: y)" in table and "p \\| q" in table
  with pytest.raises(ValueError, match="no checks"):
    ClaimRow("d", "p", "m", {})
  assert set(CLAIMS) == {
      "adopt",
      "came",
      "sharpness",
      "adabelief",
      "adapters",
      "adabound",
      "upgd",
      "swats",
      "mars",
  }
  assert markdown_table([]).count("\n") == 1


def test_upgd_claim_on_a_short_stream(tmp_path, monkeypatch):
  small = upgd.get_config(True)
  small.update(num_tasks=4, steps_per_task=150)
  sgd = upgd.task_accuracies(small, upgd.optimizers(small)["SGD"])
  assert sgd.shape == (4,) and np.all((sgd >= 0) & (sgd <= 1))
  # A new permutation every task: the first steps of each task are near chance, so a task's online
  # accuracy stays well below what 600 steps on one fixed labelling reach.
  one_task = small.copy_and_resolve_references()
  one_task.update(num_tasks=1, steps_per_task=600)
  assert sgd.mean() < upgd.task_accuracies(one_task, upgd.optimizers(one_task)["SGD"])[0]
  monkeypatch.setattr(upgd, "get_config", lambda _: small)
  (row,) = upgd.run(True, str(tmp_path))
  assert len(row.checks) == 2 and (tmp_path / "upgd.png").stat().st_size > 0


def test_swats_records_a_switch_that_stays(tmp_path, monkeypatch):
  small = swats.get_config(True)
  small.update(num_steps=300, window=50)
  results = swats.train_both(small)
  lr = results["SWATS"]["record"]
  switched = np.flatnonzero(lr > 0)
  if switched.size:  # once switched, SGD's learning rate is fixed: nonzero and constant to the end
    assert np.all(lr[switched[0] :] == lr[-1])
  monkeypatch.setattr(swats, "get_config", lambda _: small)
  (row,) = swats.run(True, str(tmp_path))
  assert len(row.checks) == 3 and (tmp_path / "swats.png").stat().st_size > 0


def test_mars_claim_row_and_plot(tmp_path, monkeypatch):
  small = mars.get_config(True)
  small.update(num_steps=100, window=20)
  monkeypatch.setattr(mars, "get_config", lambda _: small)
  (row,) = mars.run(True, str(tmp_path))
  assert "MARS" in row.measurement and (tmp_path / "mars.png").stat().st_size > 0
