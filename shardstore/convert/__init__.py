"""Checkpoints in other formats, read and written tensor by tensor (bounded memory).

``open_source(url)`` reads any supported checkpoint as a ``TensorSource`` (names, shapes, dtypes, and
row ranges of one tensor at a time): a shardstore checkpoint, a Hugging Face safetensors file or
sharded directory, a torch DCP directory, or a ``torch.save`` file. ``convert(src, dst, to=...)``
(``shardstore.convert.sinks``) streams one into another format; ``shardstore.load`` reads safetensors
through the same reader (``shardstore.hf``). ``shardstore convert`` and ``shardstore diff`` are built on these.
"""

from shardstore.convert.sources import FORMATS, TensorMeta, TensorSource, detect_format, open_source

__all__ = ["FORMATS", "TensorMeta", "TensorSource", "detect_format", "open_source"]
