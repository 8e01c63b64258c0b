"""The shared training loop: ``train(task, config)`` runs any family's ``Task``."""
from kzoo.train.config import TrainConfig
from kzoo.train.engine import TrainingStopped, train
from kzoo.train.task import Task

__all__ = ["Task", "TrainConfig", "TrainingStopped", "train"]
