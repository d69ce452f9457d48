"""What can be searched: YAML search spaces, their loader/validator, and the training recipe."""

from .space import (
    Candidate,
    Constraints,
    Dimension,
    PoolDimension,
    PriorDimension,
    Proposal,
    SearchDefaults,
    SearchSpace,
)
from .training import TrainingConfig, parse_dataset

__all__ = [
    "Candidate",
    "Constraints",
    "Dimension",
    "PoolDimension",
    "PriorDimension",
    "Proposal",
    "SearchDefaults",
    "SearchSpace",
    "TrainingConfig",
    "parse_dataset",
]
