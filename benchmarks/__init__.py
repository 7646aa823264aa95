"""Benchmarks and the demo for famo: speed, the paper's toy, MultiMNIST and QM9 (see README.md)."""
