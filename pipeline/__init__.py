"""clipdistill library: dataset manifests, teacher-feature cache, students, losses, evaluation.

The library never imports ``stages`` (the command-line entry points).
"""

__version__ = "0.1.0"
