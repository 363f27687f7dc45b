"""Shared plumbing: configs, user-facing errors, file naming and atomic writes, DDP helpers, run logs, CPU runtime."""
