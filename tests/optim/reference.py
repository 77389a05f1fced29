"""Step-by-step comparison of a jaxpeft optimizer with a reference implementation.

Both sides start from the same float64 parameters and receive the same gradient sequence; the
parameters after every step are returned so a test can compare whole trajectories.
"""

from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch

Params = dict[str, np.ndarray]


def random_problem(
    shapes: dict[str, tuple[int, ...]], num_steps: int, seed: int = 0, grad_scale: float = 1.0
) -> tuple[Params, list[Params]]:
    """Initial float64 parameters and a sequence of float64 gradients of the given shapes."""
    rng = np.random.default_rng(seed)
    params = {k: rng.normal(size=s) for k, s in shapes.items()}
    grads = [{k: grad_scale * rng.normal(size=s) for k, s in shapes.items()} for _ in range(num_steps)]
    return params, grads


def run_optax(
    tx: optax.GradientTransformation,
    params: Params,
    grads: Sequence[Params],
    extra_args: Callable[[int, Params], dict] | None = None,
) -> list[Params]:
    """Runs `tx` (jitted, float64) over the gradient sequence; returns params after each step."""
    trajectory = []
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        state = tx.init(p)

        @jax.jit
        def step(p, state, g, kwargs):
            updates, state = tx.update(g, state, p, **kwargs)
            return optax.apply_updates(p, updates), state

        for i, g in enumerate(grads):
            kwargs = extra_args(i, p) if extra_args else {}
            p, state = step(p, state, {k: jnp.asarray(v, jnp.float64) for k, v in g.items()}, kwargs)
            trajectory.append({k: np.asarray(v) for k, v in p.items()})
    return trajectory


def run_torch(
    make_optimizer: Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer],
    params: Params,
    grads: Sequence[Params],
) -> list[Params]:
    """Runs a torch optimizer (float64) over the gradient sequence; params after each step."""
    names = list(params)
    tensors = [torch.nn.Parameter(torch.tensor(params[k], dtype=torch.float64)) for k in names]
    opt = make_optimizer(tensors)
    trajectory = []
    for g in grads:
        for t, k in zip(tensors, names):
            t.grad = torch.tensor(g[k], dtype=torch.float64)
        opt.step()
        trajectory.append({k: t.detach().numpy().copy() for k, t in zip(names, tensors)})
    return trajectory


def assert_trajectories_close(ours: Sequence[Params], ref: Sequence[Params], rtol: float = 1e-6, atol: float = 0.0) -> None:
    """Fails at the first step whose parameters differ by more than `rtol` (relative)."""
    assert len(ours) == len(ref), f"{len(ours)} steps vs {len(ref)} reference steps"
    for step, (a, b) in enumerate(zip(ours, ref)):
        assert a.keys() == b.keys()
        for k in a:
            np.testing.assert_allclose(
                a[k], b[k], rtol=rtol, atol=atol, err_msg=f"param {k!r} diverges at step {step + 1}"
            )
