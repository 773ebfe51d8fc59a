"""chorus operators: pure JAX/numpy attribution math (no I/O), plus the operator service."""
