"""What can be searched: YAML search spaces, their loader/validator, and the training recipe."""

from .constraints import Constraints
from .dimensions import Dimension, PoolDimension, PriorDimension
from .search_defaults import SearchDefaults
from .space import FeasibleSample, SearchSpace
from .training import TrainingConfig, parse_dataset

__all__ = [
    "Constraints",
    "Dimension",
    "FeasibleSample",
    "PoolDimension",
    "PriorDimension",
    "SearchDefaults",
    "SearchSpace",
    "TrainingConfig",
    "parse_dataset",
]
