"""Filling a Flax parameter tree from a checkpoint's named tensors (transformers' torch layout).

Shared by the Hugging Face loaders (BERT in `hf_loader`, Gemma 3 in `gemma3_loader`): each gives the
tree it expects and its path -> tensor-name map; this module transposes kernels, checks shapes and
reports every missing, unexpected and misshaped tensor in one error.
"""

import re
from collections.abc import Callable, Mapping
from typing import Any

import flax.traverse_util
import jax.numpy as jnp
import numpy as np

from jaxpeft._messages import listed


def params_from_named_tensors(
    tensors: Mapping[str, np.ndarray],
    expected: Mapping[str, Any],
    tensor_name: Callable[[str], str],
    *,
    skipped: re.Pattern[str],
    owner: str,
    advice: str,
    param_dtype: Any = jnp.float32,
) -> dict[str, Any]:
  """The tree `expected` filled from `tensors` (kernels transposed from torch's `(out, in)`).

  Args:
    tensors: checkpoint tensor name -> array.
    expected: the model's parameter tree (arrays or `jax.ShapeDtypeStruct`s): paths and shapes to fill.
    tensor_name: '/'-joined parameter path -> checkpoint tensor name.
    skipped: checkpoint tensors the model does not use (not reported as unexpected).
    owner: what the tree belongs to, for the error ("the BERT encoder its config.json describes").
    advice: the error's last sentence: what to check.
    param_dtype: dtype of the returned parameters.

  Raises:
    ValueError: listing every missing tensor, unknown tensor and tensor of the wrong shape.
  """
  flat = flax.traverse_util.flatten_dict(dict(expected), sep="/")
  names = {path: tensor_name(path) for path in flat}
  known = set(names.values())
  missing = sorted(n for n in known if n not in tensors)
  unexpected = sorted(k for k in tensors if k not in known and not skipped.fullmatch(k))
  params, wrong_shape = {}, []
  for path, name in names.items():
    if name not in tensors:
      continue
    value = np.asarray(tensors[name])
    value = value.T if path.endswith("/kernel") else value
    if value.shape != tuple(flat[path].shape):
      wrong_shape.append(
          f"{name}: {np.shape(tensors[name])} in the checkpoint, {path} needs {tuple(flat[path].shape)}"
          + (" (transposed)" if path.endswith("/kernel") else "")
      )
    params[path] = jnp.asarray(value, dtype=param_dtype)
  if missing or unexpected or wrong_shape:
    problems = [
        f"missing tensors: {listed(missing)}" if missing else "",
        f"unexpected tensors: {listed(unexpected)}" if unexpected else "",
        f"wrong shapes: {listed(sorted(wrong_shape))}" if wrong_shape else "",
    ]
    raise ValueError(
        f"The checkpoint does not fit {owner}; " + "; ".join(p for p in problems if p) + f". {advice}"
    )
  return flax.traverse_util.unflatten_dict(params, sep="/")
