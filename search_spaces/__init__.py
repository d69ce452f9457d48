"""What can be searched: YAML search spaces, their loader/validator, and the training recipe."""

from .training import TrainingConfig, parse_dataset

__all__ = ["TrainingConfig", "parse_dataset"]
