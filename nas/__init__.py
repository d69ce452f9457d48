"""The search itself: cost model, data and training engine, Optuna study, Pareto front, export.

Imports without Ray or DeepSpeed.
"""
