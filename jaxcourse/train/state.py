"""TrainState: everything a run needs to continue, as one pytree (saved by orbax)."""
from typing import Any

import flax.struct
import jax


@flax.struct.dataclass
class TrainState:
    step: jax.Array          # optimizer steps taken; also the data position.
    params: Any
    opt_state: Any
    model_state: Any         # extra collections, e.g. {"batch_stats": ...}; {} when none.
    ema_params: Any          # None unless train.ema_decay > 0.
    rng: jax.Array           # base key; step s uses fold_in(rng, s), so resume is exact.
