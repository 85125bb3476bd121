"""What every layer shares: the one error type, phase timing, dtype names and the compute-dtype rule."""
