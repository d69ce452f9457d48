"""Execution: the CLI, Ray Tune/Train wiring and DeepSpeed workers.

The only package of the house that imports Ray and DeepSpeed, lazily: inside the functions that
need them, so `spvit-nas cost` and friends start fast. `launch.moasha` (a Ray Tune scheduler
subclass) imports Ray at module level and is itself imported only where a search starts Tune.
"""
