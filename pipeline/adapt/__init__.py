"""Adaptation with few captions (method.md 3): supervised or mean-teacher fine-tuning of a dual encoder."""
