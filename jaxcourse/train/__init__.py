"""The one training loop and its parts (see loop.py for the contract)."""
from jaxcourse.train.checkpoint import Checkpointer, tree_signature
from jaxcourse.train.loop import TrainingDiverged, train
from jaxcourse.train.metrics import MetricsWriter
from jaxcourse.train.optim import decay_mask, learning_rate, make_optimizer, make_schedule
from jaxcourse.train.state import TrainState
from jaxcourse.train.step import Task, evaluate, make_step, stack_batches

__all__ = [
    "Checkpointer", "MetricsWriter", "Task", "TrainState", "TrainingDiverged", "decay_mask",
    "evaluate", "learning_rate", "make_optimizer", "make_schedule", "make_step",
    "stack_batches", "train", "tree_signature",
]
