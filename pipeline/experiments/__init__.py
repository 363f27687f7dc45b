"""Experiment runner: sweep files expanded to deduplicated runs, trained, evaluated and written as tables."""
