"""A tiny PEFT LoRA model and a step-by-step runner, to check the adapter-aware optimizer rules
(LoRA+, LoRA-FA, Riemannian LoRA) against PEFT's optimizers.

Our side sees the adapter tree as ``jaxpeft.adapters`` builds it (Flax layout): ``{"emb":
{"embedding": {"a": (vocab, r), "b": (r, features)}}, "fc1": {"kernel": {"a": (d_in, r), "b": (r,
d_out)}, "bias": (d_out,)}, ...}``; PEFT's tensors are the transposes (``lora_A.weight: (r, d_in)``,
``lora_B.weight: (d_out, r)``, ``lora_embedding_A: (r, vocab)``, ``lora_embedding_B: (features, r)``).
Both sides start from the same random values and get the same gradients (float64).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
import peft
import torch

RANK = 2
ALPHA = 4.0

Flat = dict[str, np.ndarray]  # "fc1/kernel/a" -> array (Flax layout)


class TinyModel(torch.nn.Module):

  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(7, 4)
    self.fc1 = torch.nn.Linear(4, 5)
    self.fc2 = torch.nn.Linear(5, 3)

  def forward(self, x):
    return self.fc2(self.fc1(self.emb(x)))


def _our_path(name: str) -> str | None:
  """Our '/'-joined path of a PEFT parameter name, or None for a frozen base weight."""
  parts = name.split(".")
  module = parts[2]
  if "lora_embedding_A" in name or "lora_embedding_B" in name:
    return f"{module}/embedding/{'a' if 'lora_embedding_A' in name else 'b'}"
  if ".lora_A." in name or ".lora_B." in name:
    return f"{module}/kernel/{'a' if '.lora_A.' in name else 'b'}"
  if name.endswith("base_layer.bias"):
    return f"{module}/bias"
  return None


def peft_model(targets=("emb", "fc1", "fc2"), bias: str = "none", seed: int = 0):
  """A PEFT LoRA model with random (non-zero) factors; returns (model, {our path: torch parameter})."""
  torch.manual_seed(seed)
  config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=list(targets), bias=bias)
  model = peft.get_peft_model(TinyModel().double(), config)
  rng = np.random.default_rng(seed)
  by_path = {}
  with torch.no_grad():
    for name, p in model.named_parameters():
      path = _our_path(name)
      if path is not None and p.requires_grad:
        p.copy_(torch.tensor(rng.normal(size=p.shape)))
        by_path[path] = p
  return model, by_path


def to_ours(path: str, x: np.ndarray) -> np.ndarray:
  return x.T if x.ndim == 2 else x


def initial_params(by_path) -> Flat:
  return {k: to_ours(k, p.detach().numpy().copy()) for k, p in by_path.items()}


def random_grads(params: Flat, num_steps: int, seed: int = 1) -> list[Flat]:
  rng = np.random.default_rng(seed)
  return [{k: rng.normal(size=v.shape) for k, v in params.items()} for _ in range(num_steps)]


def run_peft(optimizer: torch.optim.Optimizer, by_path, grads: list[Flat]) -> list[Flat]:
  """Steps a PEFT optimizer with the given gradients (ours transposed to torch layout)."""
  trajectory = []
  for g in grads:
    for k, p in by_path.items():
      p.grad = torch.tensor(to_ours(k, g[k])) if p.requires_grad else None
    optimizer.step()
    trajectory.append({k: to_ours(k, p.detach().numpy().copy()) for k, p in by_path.items()})
  return trajectory


def nest(flat: Flat) -> dict:
  tree = {}
  for path, x in flat.items():
    *parents, leaf = path.split("/")
    node = tree
    for key in parents:
      node = node.setdefault(key, {})
    node[leaf] = x
  return tree


def flatten(tree) -> Flat:
  leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {"/".join(str(k.key) for k in path): np.asarray(x) for path, x in leaves}


def run_ours(tx: optax.GradientTransformation, params: Flat, grads: list[Flat]) -> list[Flat]:
  """Steps `tx` (jitted, float64) on the nested adapter tree; params after each step, flattened."""
  with jax.enable_x64(True):
    p = jax.tree.map(jnp.asarray, nest(params))
    state = tx.init(p)
    step = jax.jit(lambda p, s, g: _apply(tx, p, s, g))
    trajectory = []
    for g in grads:
      p, state = step(p, state, jax.tree.map(jnp.asarray, nest(g)))
      trajectory.append(flatten(p))
  return trajectory


def _apply(tx, p, s, g):
  updates, s = tx.update(g, s, p)
  return optax.apply_updates(p, updates), s


def assert_same_trajectories(ours: list[Flat], ref: list[Flat], rtol: float = 1e-6) -> None:
  for step, (a, b) in enumerate(zip(ours, ref, strict=True), start=1):
    assert a.keys() == b.keys(), (sorted(a), sorted(b))
    for k in a:
      np.testing.assert_allclose(a[k], b[k], rtol=rtol, err_msg=f"{k} diverges at step {step}")


MakeOptimizer = Callable[..., torch.optim.Optimizer]
