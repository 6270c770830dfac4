"""TrainState: everything a run needs to continue, as one pytree (saved by orbax)."""
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken; also the data position.
    params: Any
    opt_state: Any
    model_state: Any         # extra collections, e.g. {"batch_stats": ...}; {} when none.
    ema_params: Any          # None unless train.ema_decay > 0.
    rng: jax.Array           # base key; step s uses fold_in(rng, s), so resume is exact.


def all_finite(tree) -> jax.Array:
    """True iff every float value in `tree` is finite: one reduction (jit-friendly), so the
    loop checks a whole state inside its compiled call, not leaf by leaf on the host."""
    leaves = [x for x in jax.tree.leaves(tree)
              if hasattr(x, "dtype") and jnp.issubdtype(x.dtype, jnp.inexact)]
    if not leaves:
        return jnp.array(True)
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))
