"""Stage 2: distil a student from cached teacher targets: losses, negative queue, loss balancer, data, trainer."""
