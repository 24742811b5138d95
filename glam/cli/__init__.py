"""Command-line entry points that import their heavy parts (JAX, the measurements) only after
the arguments are read, so `--help` answers at once."""
