"""jaxpeft's default XLA flags: present after `import jaxpeft`, the user's own `$XLA_FLAGS` kept, and effective."""

import json
import os
import subprocess
import sys

import jaxpeft  # pylint: disable=unused-import  (sets the flags)
from jaxpeft import xla_flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGION_ANALYSIS = "--xla_cpu_copy_insertion_use_region_analysis"

# A donated AdaBelief update: without region analysis, XLA:CPU copies a whole state leaf.
_PROBE = """
import json, os, re
import jaxpeft
import jax, jax.numpy as jnp, optax
from jaxpeft.optim import adabelief
params = {"w": jnp.ones((64, 128))}
tx = adabelief(1e-3)
def update(params, state, grads):
  updates, state = tx.update(grads, state, params)
  return optax.apply_updates(params, updates), state
hlo = jax.jit(update, donate_argnums=(0, 1)).lower(params, tx.init(params), params).compile().as_text()
print(json.dumps({"flags": os.environ["XLA_FLAGS"], "copies": len(re.findall(r"f32\\[64,128\\]\\S* copy\\(", hlo)),
                  "devices": jax.device_count()}))
"""


def _probe(user_flags: str) -> dict:
  env = {**os.environ, "XLA_FLAGS": user_flags, "PYTHONPATH": ROOT}
  out = subprocess.run(
      [sys.executable, "-c", _PROBE], env=env, cwd=ROOT, check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_flag_is_set_in_this_process():
  assert f"{REGION_ANALYSIS}=true" in xla_flags.DEFAULT_FLAGS
  assert f"{REGION_ANALYSIS}=true" in os.environ["XLA_FLAGS"].split()
  assert "--xla_force_host_platform_device_count=8" in os.environ["XLA_FLAGS"].split()  # conftest's, kept


def test_user_flags_are_kept_and_the_default_removes_the_state_copy():
  default = _probe("--xla_force_host_platform_device_count=2")
  assert default["flags"] == f"--xla_force_host_platform_device_count=2 {REGION_ANALYSIS}=true"
  assert default["devices"] == 2 and default["copies"] == 0
  # The user's own value wins; with it off XLA copies the leaf (so the flag is what removes the copy).
  user = _probe(f"{REGION_ANALYSIS}=false")
  assert user["flags"] == f"{REGION_ANALYSIS}=false"
  assert user["copies"] >= 1
