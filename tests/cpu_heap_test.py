"""`import jaxpeft` keeps XLA:CPU's buffers mapped between calls: no page faults after the first call."""

import json
import os
import subprocess
import sys

import pytest

from jaxpeft import cpu_heap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Minor page faults per call of a jitted product with a 64 MB result, after two warm-up calls.
# The probe runs on one core and one device (no fake devices from conftest's XLA_FLAGS): with XLA on two or more
# threads a call's buffers may be freed after the next call has allocated, so the kept heap grows in steps
# during the first 100-300 calls before it stops faulting.
_PROBE = """
import json, os, resource
os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])
import jaxpeft
import jax, jax.numpy as jnp
x, w = jnp.ones((8192, 8)), jnp.ones((8, 2048))
product = jax.jit(lambda a, b: a @ b)
for _ in range(2):
  product(x, w).block_until_ready().delete()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
  product(x, w).block_until_ready().delete()
print(json.dumps({"faults": (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4}))
"""


def _faults_per_call(setting: str) -> float:
  env = {**os.environ, cpu_heap.ENV_VAR: setting, "PYTHONPATH": ROOT, "XLA_FLAGS": ""}
  out = subprocess.run(
      [sys.executable, "-c", _PROBE], env=env, cwd=ROOT, check=True, capture_output=True, text=True
  )
  return json.loads(out.stdout.strip().splitlines()[-1])["faults"]


@pytest.mark.skipif("CS_GNU_LIBC_VERSION" not in getattr(os, "confstr_names", {}), reason="glibc only")
def test_no_page_faults_after_the_first_call_and_many_without():
  pages = 8192 * 2048 * 4 // 4096
  assert _faults_per_call("0") > pages / 2  # glibc maps a fresh 64 MB block per call
  assert _faults_per_call("") < pages / 100  # with the heap kept, a call faults no new pages


def test_switch(monkeypatch):
  monkeypatch.delenv(cpu_heap.ENV_VAR, raising=False)
  assert cpu_heap.enabled()
  monkeypatch.setenv(cpu_heap.ENV_VAR, "0")
  assert not cpu_heap.enabled()
  monkeypatch.setenv(cpu_heap.ENV_VAR, "on")
  with pytest.raises(ValueError, match="JAXPEFT_CPU_HEAP='on'"):
    cpu_heap.enabled()
