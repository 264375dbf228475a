"""Benchmarks and workloads: they drive the system from outside or through the public offline API."""
