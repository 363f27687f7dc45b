"""What every trainer shares: RNG capture, seeding, checkpoints that load safely, precision, run folders."""
