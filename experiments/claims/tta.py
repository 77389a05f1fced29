"""The TTA papers' claims, checked on the numbers of experiments/tta.py (no absl flags here)."""


def check_claims(
    table: dict[str, dict[str, float]],
    backward: dict[str, int],
    continual: dict[str, float],
    non_iid: dict[str, float],
) -> list[tuple[str, bool, str]]:
  """`(claim, holds, numbers)` for each claim; `table[method][corruption]` and the other maps are errors."""
  mean = {m: table[m]["mean"] for m in table}
  claims = [
      (
          "Tent and BN-adapt beat the source model on average",
          mean["tent"] < mean["source"] and mean["bn_adapt"] < mean["source"],
          f"source {100 * mean['source']:.1f}%, BN-adapt {100 * mean['bn_adapt']:.1f}%, "
          f"Tent {100 * mean['tent']:.1f}%",
      ),
      (
          "EATA matches or beats Tent with fewer backward passes",
          mean["eata"] <= mean["tent"] + 0.005 and backward["eata"] < backward["tent"],
          f"EATA {100 * mean['eata']:.1f}% with {backward['eata']} images back-propagated, Tent "
          f"{100 * mean['tent']:.1f}% with {backward['tent']}",
      ),
      (
          "CoTTA degrades less than Tent when adapting continually (continual minus reset error)",
          continual["cotta"] - mean["cotta"] < continual["tent"] - mean["tent"],
          f"Tent {100 * mean['tent']:.1f}% -> {100 * continual['tent']:.1f}%, CoTTA {100 * mean['cotta']:.1f}% -> "
          f"{100 * continual['cotta']:.1f}%",
      ),
      (
          "Under non-i.i.d. labels BN-adapt hurts and LAME helps (vs source)",
          non_iid["bn_adapt"] > non_iid["source"] and non_iid["lame"] < non_iid["source"],
          f"source {100 * non_iid['source']:.1f}%, BN-adapt {100 * non_iid['bn_adapt']:.1f}%, LAME "
          f"{100 * non_iid['lame']:.1f}%",
      ),
  ]
  return claims
