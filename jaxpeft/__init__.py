"""jaxpeft: optimizers as optax transforms, adapters for Flax models, and a training harness."""

from jaxpeft import cpu_heap, xla_flags

xla_flags.add_default_flags()
if cpu_heap.enabled():
  cpu_heap.keep_heap()

__version__ = "0.1.0"
