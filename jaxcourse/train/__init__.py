"""The one training loop and its parts (see loop.py for the contract)."""
from jaxcourse.train.checkpoint import Checkpointer, tree_signature
from jaxcourse.train.loop import Task, TrainingDiverged, evaluate, make_step, stack_batches, train
from jaxcourse.train.metrics import MetricsWriter
from jaxcourse.train.optim import decay_mask, make_optimizer, make_schedule
from jaxcourse.train.state import TrainState

__all__ = [
    "Checkpointer", "MetricsWriter", "Task", "TrainState", "TrainingDiverged", "decay_mask",
    "evaluate", "make_optimizer", "make_schedule", "make_step", "stack_batches", "train",
    "tree_signature",
]
