"""jaxpeft: optimizers as optax transforms, adapters for Flax models, and a training harness."""

__version__ = "0.1.0"
