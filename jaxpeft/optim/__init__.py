"""Optimizers as optax transformations, each faithful to its paper's reference implementation.

Every optimizer `<name>(learning_rate, ...)` returns an `optax.GradientTransformation` (or
`GradientTransformationExtraArgs` when it needs more than the gradient) and exposes its core as
`scale_by_<name>` for use in `optax.chain`.
"""

from jaxpeft.optim.adabelief import AdaBeliefState, adabelief, scale_by_adabelief
from jaxpeft.optim.adabound import AdaBoundState, adabound, scale_by_adabound
from jaxpeft.optim.adahessian import ScaleByAdaHessianState, adahessian, hutchinson_hessian_diagonal, scale_by_adahessian
from jaxpeft.optim.adam_cm import AdamCMState, adam_cm, scale_by_adam_cm
from jaxpeft.optim.adamod import AdaModState, adamod, scale_by_adamod
from jaxpeft.optim.adopt import AdoptState, adopt, scale_by_adopt
from jaxpeft.optim.came import CameState, came, scale_by_came
from jaxpeft.optim.cosmos import CosmosState, cosmos, scale_by_cosmos
from jaxpeft.optim.exadam import EXAdamState, exadam, scale_by_exadam
from jaxpeft.optim.grams import GramsState, grams, scale_by_grams
from jaxpeft.optim.lora_fa import lora_fa, project_lora_fa_gradients
from jaxpeft.optim.loraplus import loraplus, scale_by_loraplus
from jaxpeft.optim.mars import MarsState, mars, scale_by_mars
from jaxpeft.optim.momo import MomoAdamState, MomoState, momo, momo_adam, scale_by_momo, scale_by_momo_adam
from jaxpeft.optim.muon import MuonState, muon, scale_by_muon
from jaxpeft.optim.optimistic_amsgrad import OptimisticAMSGradState, optimistic_amsgrad, scale_by_optimistic_amsgrad
from jaxpeft.optim.riemannian_lora import precondition_lora_gradients, riemannian_lora
from jaxpeft.optim.sam import sam, scale_by_sam
from jaxpeft.optim.sania import SaniaState, sania, scale_by_sania
from jaxpeft.optim.soap import SoapState, scale_by_soap, soap
from jaxpeft.optim.swats import SwatsState, scale_by_swats, swats
from jaxpeft.optim.tram import TramState, scale_by_tram, tram
from jaxpeft.optim.upgd import UpgdState, scale_by_upgd, upgd

__all__ = [
    "AdaBeliefState",
    "AdaBoundState",
    "AdamCMState",
    "AdaModState",
    "AdoptState",
    "CameState",
    "CosmosState",
    "EXAdamState",
    "GramsState",
    "MarsState",
    "MomoAdamState",
    "MomoState",
    "MuonState",
    "OptimisticAMSGradState",
    "SaniaState",
    "ScaleByAdaHessianState",
    "SoapState",
    "SwatsState",
    "TramState",
    "UpgdState",
    "adabelief",
    "adabound",
    "adahessian",
    "adam_cm",
    "adamod",
    "adopt",
    "came",
    "cosmos",
    "exadam",
    "grams",
    "mars",
    "momo",
    "momo_adam",
    "muon",
    "optimistic_amsgrad",
    "sam",
    "sania",
    "soap",
    "swats",
    "tram",
    "upgd",
    "hutchinson_hessian_diagonal",
    "scale_by_adabelief",
    "scale_by_adabound",
    "scale_by_adahessian",
    "scale_by_adam_cm",
    "scale_by_adamod",
    "scale_by_adopt",
    "scale_by_came",
    "scale_by_cosmos",
    "scale_by_exadam",
    "scale_by_grams",
    "scale_by_mars",
    "scale_by_momo",
    "scale_by_momo_adam",
    "scale_by_muon",
    "scale_by_optimistic_amsgrad",
    "scale_by_sam",
    "scale_by_sania",
    "scale_by_soap",
    "scale_by_swats",
    "scale_by_tram",
    "scale_by_upgd",
    # Adapter-aware rules (they read the LoRA factors "a"/"b" of an adapter tree).
    "lora_fa",
    "loraplus",
    "precondition_lora_gradients",
    "project_lora_fa_gradients",
    "riemannian_lora",
    "scale_by_loraplus",
]
