"""Small loaders for the real data the examples and benchmarks run on (nothing downloads)."""
