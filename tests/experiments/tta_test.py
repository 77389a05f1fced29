"""experiments/tta.py's claim checks on hand-written numbers (each claim can hold and fail)."""

from experiments.claims.tta import check_claims


def _table(**means):
  return {m: {"mean": v} for m, v in means.items()}


def test_claims_hold_and_fail_on_the_numbers():
  table = _table(source=0.5, bn_adapt=0.4, tent=0.3, eata=0.3, cotta=0.35)
  holds = check_claims(
      table,
      {"eata": 100, "tent": 640},
      {"tent": 0.6, "cotta": 0.36},
      {"source": 0.5, "bn_adapt": 0.7, "lame": 0.45},
  )
  assert [ok for _, ok, _ in holds] == [True, True, True, True]
  fails = check_claims(
      _table(source=0.5, bn_adapt=0.6, tent=0.3, eata=0.32, cotta=0.35),
      {"eata": 700, "tent": 640},
      {"tent": 0.3, "cotta": 0.5},
      {"source": 0.5, "bn_adapt": 0.4, "lame": 0.55},
  )
  assert [ok for _, ok, _ in fails] == [False, False, False, False]
  assert "EATA 32.0% with 700 images" in fails[1][2]
