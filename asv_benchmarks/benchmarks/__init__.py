"""asv benchmarks of fastbn (run from asv_benchmarks/: see the README)."""
