"""Checkpoints of sharded training state as Zarr v3 arrays through fsspec, resharded on load."""
