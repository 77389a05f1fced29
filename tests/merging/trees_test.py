"""Bad input, sharded trees and streaming memory for the merging methods (jaxpeft/merging/trees.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jaxpeft import merging
from tests.merging import references as ref

METHODS = {
    "task_arithmetic": lambda b, ms: merging.task_arithmetic(b, ms, 0.5),
    "ties": lambda b, ms: merging.ties(b, ms, 1.0, 0.2),
    "dare_ties": lambda b, ms: merging.dare(b, ms, 1.0, 0.5, key=jax.random.key(0), combination="ties"),
    "linear": lambda b, ms: merging.linear(ms),
}


def test_structure_and_shape_mismatches_name_the_leaf():
  base, models = ref.trees(n=2)
  extra = {**models[1], "head": {"kernel": np.zeros((5, 2), np.float32)}}
  with pytest.raises(ValueError, match=r"Leaf 'head/kernel' is only in model 1"):
    merging.ties(base, [models[0], extra])
  reshaped = {**models[1], "out": {"kernel": np.zeros((3, 5), np.float32)}}
  with pytest.raises(
      ValueError, match=r"Leaf 'out/kernel' has shape \(3, 5\) in model 1 but \(5, 3\) in the base"
  ):
    merging.task_arithmetic(base, [models[0], reshaped])


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_densities_outside_0_1_are_refused(density):
  base, models = ref.trees(n=2)
  for merge in (
      lambda: merging.ties(base, models, density=density),
      lambda: merging.dare(base, models, density=density, key=jax.random.key(0)),
      lambda: merging.task_arithmetic(base, models, density=[0.5, density]),
  ):
    with pytest.raises(ValueError, match=r"density must be in \[0, 1\]"):
      merge()


def test_a_different_base_is_detected_by_its_checksum():
  base, models = ref.trees(n=2)
  recorded = {"run_a": merging.base_checksum(base), "run_b": merging.base_checksum(base)}
  merging.check_base(base, recorded)
  other = jax.tree.map(lambda x: x + 1e-3, base)
  with pytest.raises(ValueError, match=r"\['run_a', 'run_b'\] were fine-tuned from a different base"):
    merging.check_base(other, recorded)


@pytest.mark.parametrize("name", sorted(METHODS))
def test_sharded_inputs_give_sharded_outputs_without_gathers(name):
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  base, models = ref.trees(n=3)
  place = lambda t: jax.tree.map(lambda x: jax.device_put(np.resize(x, (16,) + x.shape[1:]), sharding), t)
  base, models = place(base), [place(m) for m in models]
  merge = jax.jit(METHODS[name])
  hlo = merge.lower(base, models).compile().as_text()
  assert "all-gather" not in hlo and "all-to-all" not in hlo
  out = merge(base, models)
  for leaf in jax.tree_util.tree_leaves(out):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim) and not leaf.sharding.is_fully_replicated


@pytest.mark.parametrize("name", sorted(METHODS))
def test_merging_holds_at_most_two_trees_beyond_the_inputs(name):
  """XLA's buffer sizes for N = 4 models of 16 leaves: output + temporaries <= 2 trees.

  DARE gets fixed masks here (inputs): drawing the masks from a key compiles 64 threefry draws, slowly on CPU.
  """
  base = {f"layer_{i}": {"kernel": jnp.zeros((96, 96))} for i in range(16)}
  models = [base] * 4
  tree_bytes = 16 * 96 * 96 * 4
  merge = METHODS[name]
  if name == "dare_ties":
    masks = [jax.tree.map(lambda x: jnp.ones(x.shape, bool), base)] * 4
    merge = lambda b, ms: merging.dare(b, ms, 1.0, 0.5, masks=masks, combination="ties")
  memory = jax.jit(merge).lower(base, models).compile().memory_analysis()
  beyond_inputs = memory.output_size_in_bytes + memory.temp_size_in_bytes
  assert beyond_inputs <= 2 * tree_bytes, (name, beyond_inputs / tree_bytes)
  assert memory.argument_size_in_bytes >= 4 * tree_bytes  # the inputs are counted apart (4 models + a base)


def test_a_tree_on_an_incompatible_mesh_names_the_leaf():
  devices = jax.devices()[:8]
  base, models = ref.trees(n=2)
  on = lambda t, mesh: jax.tree.map(lambda x: jax.device_put(x, NamedSharding(mesh, P())), t)
  mesh_a, mesh_b = Mesh(np.array(devices[:4]), ("data",)), Mesh(np.array(devices[4:]), ("data",))
  base, first = on(base, mesh_a), on(models[0], mesh_a)
  second = {**on(models[1], mesh_a), "out": on(models[1]["out"], mesh_b)}
  with pytest.raises(ValueError, match=r"Leaf 'out/kernel' is on 4 device\(s\) \[4, 5, 6, 7\] in model 1"):
    merging.ties(base, [first, second])
