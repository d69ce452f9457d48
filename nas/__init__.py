"""The search itself: data and training engine, Optuna study and storage, the run folder
(`nas.run`), Pareto front, reports, export.

Imports without Ray or DeepSpeed (tests/test_imports.py checks it).
"""
