"""Fault-injection tests: hostile inputs, damaged checkpoints, racing and killed writers."""
