"""The TTA papers' claims, checked on the mean errors of experiments/tta.py (no absl flags here)."""

Claim = tuple[str, bool | None, str]


def _pct(value: float | None) -> str:
  return "n/a" if value is None else f"{100 * value:.1f}%"


def check_claims(means: dict[str, dict[str, float]], backward: dict[str, int]) -> list[Claim]:
  """`(claim, holds, numbers)` per claim; `holds` is None where a needed method or setting did not run.

  Args:
    means: `means[setting][method]`, the mean error (fraction) over the corruptions; settings as
      experiments/tta.py's SETTINGS ('one_at_a_time', 'continual', 'non_iid', 'mixed', 'mixed_bs1').
    backward: images back-propagated per method in the 'one_at_a_time' setting.
  """
  get = lambda setting, method: means.get(setting, {}).get(method)
  reset = lambda m: get("one_at_a_time", m)
  drift = lambda m: None if get("continual", m) is None or reset(m) is None else get("continual", m) - reset(m)

  def claim(text, needed, test, numbers):
    if any(v is None for v in needed):
      return text, None, numbers
    return text, bool(test()), numbers

  claims = [
      claim(
          "Tent and BN-adapt beat the source model on average",
          [reset("tent"), reset("bn_adapt"), reset("source")],
          lambda: reset("tent") < reset("source") and reset("bn_adapt") < reset("source"),
          f"source {_pct(reset('source'))}, BN-adapt {_pct(reset('bn_adapt'))}, Tent {_pct(reset('tent'))}",
      ),
      claim(
          "EATA matches or beats Tent (within 0.5 points) with fewer backward passes",
          [reset("eata"), reset("tent"), backward.get("eata"), backward.get("tent")],
          lambda: reset("eata") <= reset("tent") + 0.005 and backward["eata"] < backward["tent"],
          f"EATA {_pct(reset('eata'))} with {backward.get('eata')} images back-propagated, Tent "
          f"{_pct(reset('tent'))} with {backward.get('tent')}",
      ),
  ]
  for method, name in (("cotta", "CoTTA"), ("rmt", "RMT")):
    claims.append(
        claim(
            f"{name} does not degrade over the continual sequence where Tent does (continual minus reset error)",
            [drift(method), drift("tent")],
            lambda m=method: drift("tent") > 0 and drift(m) <= 0.005,
            f"Tent {_pct(reset('tent'))} -> {_pct(get('continual', 'tent'))}, {name} {_pct(reset(method))} -> "
            f"{_pct(get('continual', method))}",
        )
    )
  claims += [
      claim(
          "SAR is stable at batch size 1 and on mixed shifts where Tent collapses",
          [get(s, m) for s in ("mixed", "mixed_bs1") for m in ("sar", "tent", "source")],
          lambda: all(
              get(s, "sar") < get(s, "tent") and get(s, "sar") <= get(s, "source") for s in ("mixed", "mixed_bs1")
          ),
          f"mixed: source {_pct(get('mixed', 'source'))}, Tent {_pct(get('mixed', 'tent'))}, SAR "
          f"{_pct(get('mixed', 'sar'))}; batch size 1: source {_pct(get('mixed_bs1', 'source'))}, Tent "
          f"{_pct(get('mixed_bs1', 'tent'))}, SAR {_pct(get('mixed_bs1', 'sar'))}",
      ),
      claim(
          "Under non-i.i.d. labels BN-adapt hurts and LAME helps (vs source)",
          [get("non_iid", m) for m in ("source", "bn_adapt", "lame")],
          lambda: get("non_iid", "bn_adapt") > get("non_iid", "source")
          and get("non_iid", "lame") < get("non_iid", "source"),
          f"source {_pct(get('non_iid', 'source'))}, BN-adapt {_pct(get('non_iid', 'bn_adapt'))}, LAME "
          f"{_pct(get('non_iid', 'lame'))}",
      ),
  ]
  return claims
