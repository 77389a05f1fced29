"""The claims `experiments/run.py` runs, by name (kept apart from run.py so importing them defines no flags)."""

from experiments.claims import adabelief, adabound, adapters, adopt, came, mars, sharpness, swats, upgd

CLAIMS = {
    module.NAME: module for module in (adopt, came, sharpness, adabelief, adapters, adabound, upgd, swats, mars)
}
