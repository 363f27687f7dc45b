"""Command-line entry points, one module per stage; ``stages.cli`` wires them into one app."""
