"""layertap benchmarks: `make bench` (CPU). Each measurement runs in a fresh process."""
