"""Convert a checkpoint between formats, tensor by tensor (bounded memory): a shardstore checkpoint
(zarr), Hugging Face safetensors (one file, or a directory with model.safetensors or shards and
model.safetensors.index.json), a torch DCP directory (dcp), a torch.save file (torch, read with
weights_only=True). The source format is detected. Tensor values round-trip bit for bit. zarr, dcp and
torch keep the whole state dict (nesting and plain values such as a step count); safetensors holds
tensors only, under dotted names: what it drops is named in a warning and in --json ("dropped").
A torch DCP directory keeps dict keys as strings and no empty dicts (DCP's own format): both are named
too ("str_keys", "dropped").
A dcp or safetensors directory is written only where nothing is (a new or empty directory); a local
target is written beside DST and renamed into place once complete, so a failed or killed convert leaves
DST as it was (a killed one may leave a DST.converting-<hex> to delete)."""

from __future__ import annotations

import argparse
import sys

from shardstore.cli.common import EXIT_OK, human_bytes, print_json, progress, storage_options
from shardstore.convert import FORMATS
from shardstore.convert.sinks import convert
from shardstore.convert.safetensors import DEFAULT_MAX_SHARD_BYTES

NAME = "convert"
HELP = "convert between zarr (shardstore), safetensors, torch DCP and torch.save checkpoints"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="the checkpoint to read")
    parser.add_argument("dst", metavar="DST", help="where to write (a *.safetensors path writes one file)")
    parser.add_argument("--to", required=True, choices=FORMATS, help="the format to write")
    parser.add_argument("--from", dest="src_format", choices=FORMATS, help="the source format (default: detected)")
    parser.add_argument("--overwrite", action="store_true", help="replace a shardstore checkpoint at DST (--to zarr)")
    parser.add_argument("--max-shard-size", type=int, default=DEFAULT_MAX_SHARD_BYTES, metavar="BYTES",
                        help="safetensors: split into shards of at most this many bytes, with an index")


def run(args: argparse.Namespace) -> int:
    with progress(None, f"converting to {args.to}") as bar:
        done = convert(args.src, args.dst, args.to, storage_options=storage_options(args), src_format=args.src_format,
                       overwrite=args.overwrite, max_shard_bytes=args.max_shard_size, progress=bar.update)
    if done.dropped:
        _warn(f"{args.to} cannot hold {len(done.dropped)} non-tensor entr{'y' if len(done.dropped) == 1 else 'ies'} "
              f"of {args.src}, left out: {', '.join(done.dropped)}; convert to zarr or torch to keep them")
    if done.str_keys:
        _warn(f"{args.to} stores dict keys as strings: the int keys of {', '.join(done.str_keys)} read back as str")
    if args.json:
        print_json({"src": args.src, "dst": args.dst, "to": args.to, "tensors": done.tensors, "nbytes": done.nbytes,
                    "dropped": list(done.dropped), "str_keys": list(done.str_keys)})
    else:
        print(f"wrote {done.tensors} tensors ({human_bytes(done.nbytes)}) from {args.src} to {args.dst} as {args.to}")
    return EXIT_OK


def _warn(text: str) -> None:
    print(f"shardstore convert: warning: {text}", file=sys.stderr)
