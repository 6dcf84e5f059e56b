"""A distributed tensor whose public API mirrors ``torch.distributed.tensor`` name for name."""
