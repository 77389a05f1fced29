"""The harness asks the method: loss terms, weight-decay exemptions and update rules reached from the config.

References are closed forms written out in numpy: SoRA's trainer (TsinghuaC3I/SoRA ``src/trainer.py``:
``loss += sparse_lambda * sum|gate| / numel(gates)``, gates in no weight-decay group), CLIP-SVD
(``vector_S`` trained without weight decay), SALT's regulariser and PELA's ``inf_norm`` term.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from flax import traverse_util

from configs import common
from jaxpeft.train.trainable import Trainable, training_optimizer

D_IN, D_OUT = 12, 6
LR, WD, EPS = 0.1, 0.25, 1e-8


class _TwoLayers(nn.Module):

  @nn.compact
  def __call__(self, x, *, train=False):
    del train
    return nn.Dense(D_OUT, name="out")(nn.tanh(nn.Dense(D_IN, name="hidden")(x)))


def _config(method, penalty=None, update=None, options=None, weight_decay=WD):
  adapter = common.adapter(method, "(hidden|out)/kernel", rank=2, alpha=2.0)
  adapter.penalty = ml_collections.ConfigDict(penalty or {})
  adapter.update = ml_collections.ConfigDict(update or {})
  adapter.options = ml_collections.ConfigDict(options or {})
  optimizer = ml_collections.ConfigDict(
      {
          "name": "adamw",
          "learning_rate": LR,
          "schedule": "constant",
          "warmup_steps": 0,
          "grad_clip_norm": 0.0,
          "b1": None,
          "b2": None,
          "b3": None,
          "eps": EPS,
          "weight_decay": weight_decay,
      }
  )
  return ml_collections.ConfigDict(
      {"trainable": {"base": ""}, "adapter": adapter, "optimizer": optimizer, "num_train_steps": 10}
  )


def _start(config):
  trainable = Trainable.from_config(_TwoLayers(), config)
  base = _TwoLayers().init(jax.random.key(0), jnp.ones((1, D_IN)))["params"]
  params, frozen = trainable.split(jax.random.key(1), base)
  return trainable, params, frozen, base


def _flat(tree):
  return {k: np.asarray(v) for k, v in traverse_util.flatten_dict(tree, sep="/").items()}


def _first_adamw_step(grads, params, decay):
  """One AdamW step from zero moments (bias-corrected: m_hat = g, v_hat = g^2), decoupled decay."""
  return params - LR * (grads / (np.abs(grads) + EPS) + (WD * params if decay else 0.0))


def _nonzero_params_and_grads(trainable, params, frozen):
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, D_IN)), jnp.float32)
  params = jax.tree.map(lambda v: v + 0.05, params)  # non-zero factors so every leaf has a gradient
  grads = jax.grad(lambda p: jnp.sum(trainable.apply(p, frozen, [x], train=False) ** 2))(params)
  return params, grads


@pytest.mark.parametrize(
    "method, trained, no_decay", [("sora", {"a", "b", "gate"}, {"gate"}), ("svd_ft", {"s"}, {"s"})]
)
def test_the_method_s_no_decay_leaves_are_not_decayed(method, trained, no_decay):
  update = {"sparse_lambda": 0.0} if method == "sora" else None  # a zero threshold: the prox is the identity
  config = _config(method, update=update)
  trainable, params, frozen, _ = _start(config)
  tx = training_optimizer(trainable, config)  # as the loop
  params, grads = _nonzero_params_and_grads(trainable, params, frozen)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = optax.apply_updates(params, updates)
  frozen_leaves = {"u", "vt", "s0"} if method == "svd_ft" else set()
  checked = set()
  for (path, p), g, n in zip(
      _flat(params["adapter"]).items(), _flat(grads["adapter"]).values(), _flat(new["adapter"]).values()
  ):
    name = path.rpartition("/")[2]
    if name in frozen_leaves:
      continue
    np.testing.assert_allclose(
        n, _first_adamw_step(g, p, decay=name not in no_decay), rtol=1e-5, atol=1e-6, err_msg=path
    )
    checked.add(name)
  assert checked == trained


def test_sora_loss_term_is_the_reference_mean_gate_l1():
  lam = 0.3
  trainable, params, frozen, _ = _start(
      _config("sora", penalty={"sparse_lambda": lam}, update={"sparse_lambda": lam})
  )
  gates = [np.asarray(params["adapter"][layer]["kernel"]["gate"]) for layer in ("hidden", "out")]
  expected = lam * sum(np.abs(g).sum() for g in gates) / sum(g.size for g in gates)
  np.testing.assert_allclose(trainable.regularizer(params, frozen, jax.random.key(0)), expected, rtol=1e-6)
  grad = jax.grad(lambda p: trainable.regularizer(p, frozen, jax.random.key(0)))(params)
  np.testing.assert_allclose(
      grad["adapter"]["out"]["kernel"]["gate"], lam * np.sign(gates[1]) / sum(g.size for g in gates), rtol=1e-6
  )
  np.testing.assert_array_equal(grad["adapter"]["out"]["kernel"]["a"], 0.0)


def test_sora_update_rule_and_loss_term_come_from_the_config_together():
  trainable, *_ = _start(_config("sora", penalty={"sparse_lambda": 1e-3}, update={"sparse_lambda": 1e-3}))
  assert trainable.update is not None and trainable.penalty is not None
  with pytest.raises(ValueError, match="sparse_lambda"):
    _start(_config("sora", penalty={"lambda_rank": 1e-3}, update={"sparse_lambda": 1e-3}))


def test_salt_regularizer_is_reachable_from_the_config():
  weight = 0.7
  trainable, params, frozen, _ = _start(
      _config("salt", penalty={"reg_multiplier": weight}, options={"ratio": 0.5})
  )
  params = jax.tree.map(lambda v: v + 0.01, params)
  expected = 0.0
  for layer in ("hidden", "out"):
    leaves = {k: np.asarray(v, np.float64) for k, v in params["adapter"][layer]["kernel"].items()}
    top = leaves["s"][: leaves["scale"].shape[-1]]
    expected += np.linalg.norm(leaves["scale"] * top + leaves["shift"] - top) + np.linalg.norm(
        leaves["x"] @ leaves["y"]
    )
  np.testing.assert_allclose(
      trainable.regularizer(params, frozen, jax.random.key(0)), weight * expected, rtol=1e-5
  )


def test_pela_weight_perturbation_term_is_reachable_from_the_config():
  weight, eps = 2.0, 1e-3
  trainable, params, frozen, base = _start(_config("pela", penalty={"weight": weight, "eps": eps}))
  params = jax.tree.map(lambda v: v * 1.1, params)
  terms = []
  for layer in ("hidden", "out"):
    leaves = params["adapter"][layer]["kernel"]
    residual = np.abs(np.asarray(leaves["a"]) @ np.asarray(leaves["b"]) - np.asarray(base[layer]["kernel"]))
    terms.append((residual.max() - eps) ** 2)
  np.testing.assert_allclose(
      trainable.regularizer(params, frozen, jax.random.key(0)), weight * np.mean(terms), rtol=1e-5
  )


def test_a_loss_term_option_for_a_method_without_one_is_an_error():
  with pytest.raises(ValueError, match="no loss term"):
    _start(_config("lora", penalty={"weight": 1.0}))


def test_gradient_clipping_takes_one_global_norm_over_every_optimizer_group():
  """SoRA's gates (the no-decay group) and factors (the decayed group) are clipped by the norm of all of them.

  Closed form with SGD (weight decay as L2 on the clipped gradient): ``p - lr (g c / ||g|| + wd p)``, ``||g||``
  the global norm over every trained leaf, ``wd = 0`` for the gates.
  """
  config = _config("sora", update={"sparse_lambda": 0.0})  # a zero threshold: the prox is the identity
  config.optimizer.update(name="sgd", eps=None)
  trainable, params, frozen, _ = _start(config)
  params, grads = _nonzero_params_and_grads(trainable, params, frozen)
  flat_grads, flat_params = _flat(grads["adapter"]), _flat(params["adapter"])
  global_norm = np.sqrt(sum(np.sum(g.astype(np.float64) ** 2) for g in flat_grads.values()))
  clip = global_norm / 4
  config.optimizer.grad_clip_norm = float(clip)
  tx = training_optimizer(trainable, config)
  updates, _ = tx.update(grads, tx.init(params), params)
  new = _flat(optax.apply_updates(params, updates)["adapter"])
  assert {path.rpartition("/")[2] for path in new} == {"a", "b", "gate"}
  for path, p in flat_params.items():
    decay = WD * p if not path.endswith("/gate") else 0.0
    np.testing.assert_allclose(
        new[path], p - LR * (flat_grads[path] * clip / global_norm + decay), rtol=1e-5, atol=1e-7, err_msg=path
    )
