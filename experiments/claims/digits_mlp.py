"""A small ReLU MLP on scikit-learn's 8x8 digits, trained by any optax transformation inside `lax.scan`.

For the optimizer claims that need thousands of cheap steps (UPGD's stream of tasks, SWATS's
switch, MARS against AdamW): the data (1797 images, standardised, 1437 train / 360 test) fit in
memory, and a whole run is one compiled scan. Each step draws its batch by index from a key, and a
step may permute the labels (a label-permuted task stream, as in the UPGD paper).
"""

from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

NUM_CLASSES = 10
NUM_TRAIN = 1437

Params = list[tuple[jax.Array, jax.Array]]


def load() -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
  """(x_train, y_train, x_test, y_test), features standardised with the training split's statistics."""
  digits = load_digits()
  order = np.random.default_rng(0).permutation(len(digits.target))
  x, y = digits.data[order].astype(np.float32), digits.target[order].astype(np.int32)
  mean, std = x[:NUM_TRAIN].mean(0), x[:NUM_TRAIN].std(0) + 1.0
  x = (x - mean) / std
  return (
      jnp.asarray(x[:NUM_TRAIN]),
      jnp.asarray(y[:NUM_TRAIN]),
      jnp.asarray(x[NUM_TRAIN:]),
      jnp.asarray(y[NUM_TRAIN:]),
  )


def init_mlp(key: jax.Array, sizes: tuple[int, ...]) -> Params:
  """He-initialised dense layers, zero biases."""
  keys = jax.random.split(key, len(sizes) - 1)
  return [
      (jax.random.normal(k, (m, n)) * jnp.sqrt(2.0 / m), jnp.zeros((n,)))
      for k, m, n in zip(keys, sizes[:-1], sizes[1:])
  ]


def logits(params: Params, x: jax.Array) -> jax.Array:
  for w, b in params[:-1]:
    x = jax.nn.relu(x @ w + b)
  w, b = params[-1]
  return x @ w + b


def loss(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits(params, x), y).mean()


def accuracy(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
  return jnp.mean(jnp.argmax(logits(params, x), -1) == y)


def train(
    tx: optax.GradientTransformation,
    params: Params,
    x: jax.Array,
    y: jax.Array,
    *,
    num_steps: int,
    batch_size: int,
    key: jax.Array,
    relabel: Callable[[jax.Array, jax.Array], jax.Array] = lambda step, y: y,
    record: Callable[[optax.OptState], jax.Array] = lambda state: jnp.zeros(()),
) -> tuple[Params, dict[str, np.ndarray]]:
  """`num_steps` steps on random batches; per step: loss and accuracy *before* the update, `record(state)`.

  `relabel(step, y)` gives the labels the step trains on (identity, or a task's permutation).
  """

  def step(carry, inputs):
    p, state = carry
    i, k = inputs
    idx = jax.random.randint(k, (batch_size,), 0, x.shape[0])
    xb, yb = x[idx], relabel(i, y[idx])
    value, grads = jax.value_and_grad(loss)(p, xb, yb)
    updates, state = tx.update(grads, state, p)
    return (optax.apply_updates(p, updates), state), (value, accuracy(p, xb, yb), record(state))

  run = jax.jit(lambda carry, xs: jax.lax.scan(step, carry, xs))
  (params, _), (losses, accs, records) = run(
      (params, tx.init(params)), (jnp.arange(num_steps), jax.random.split(key, num_steps))
  )
  return params, {"loss": np.asarray(losses), "accuracy": np.asarray(accs), "record": np.asarray(records)}


def train_and_test(
    optimizers: dict[str, optax.GradientTransformation],
    *,
    hidden: tuple[int, ...],
    num_steps: int,
    batch_size: int,
    seed: int,
    records: dict[str, Callable[[optax.OptState], jax.Array]] | None = None,
) -> dict[str, dict]:
  """Trains the same MLP from the same start on the same batches with each optimizer.

  Returns, per optimizer, `train`'s history plus ``test_accuracy`` of the final parameters.
  """
  x, y, x_test, y_test = load()
  key_init, key_data = jax.random.split(jax.random.key(seed))
  params = init_mlp(key_init, (x.shape[1], *hidden, NUM_CLASSES))
  out = {}
  for name, tx in optimizers.items():
    kw = {"record": records[name]} if records and name in records else {}
    final, history = train(tx, params, x, y, num_steps=num_steps, batch_size=batch_size, key=key_data, **kw)
    out[name] = {**history, "test_accuracy": float(accuracy(final, x_test, y_test))}
  return out
