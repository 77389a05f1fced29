"""jaxpeft: optimizers as optax transforms, adapters for Flax models, and a training harness."""

from jaxpeft import xla_flags

xla_flags.add_default_flags()

__version__ = "0.1.0"
