"""Test-time adaptation methods, one per file; each a pure jittable `step(tta_state, images)`.

`METHODS` maps a method name to its module; every module has a `Config` dataclass (authors' defaults),
`init(params, model_state, config) -> TTAState` and `step(state, images) -> (state, logits)`.
"""

from jaxpeft.tta import adanpc, alpha_bn, bn_adapt, cafa, cotta, eata, lame, ostta, rmt, sar, source, tent, unmix_tns

METHODS = {
    "source": source,
    "bn_adapt": bn_adapt,
    "alpha_bn": alpha_bn,
    "unmix_tns": unmix_tns,
    "tent": tent,
    "eata": eata,
    "sar": sar,
    "ostta": ostta,
    "lame": lame,
    "adanpc": adanpc,
    "cafa": cafa,
    "cotta": cotta,
    "rmt": rmt,
}
