"""Remove the commit lock ``<URL>.lock`` that a process killed while committing to or deleting the
checkpoint at URL left on an object store. Such a lock outlives its process, and every later overwrite
of that URL waits 30 s for it and fails, while retention keeps the step. Only a lock at least
--older-than seconds old is removed (by the store's clock against this host's): a commit holds it for
milliseconds, a deletion of the checkpoint as long as that takes. Local locks die with their process:
a held one is never removed."""

from __future__ import annotations

import argparse

from shardstore.cli.common import EXIT_OK, print_json, storage_options
from shardstore.commit_lock import unlock
from shardstore.storage import Storage

NAME = "unlock"
HELP = "remove a commit lock a killed process left on an object store"
DEFAULT_OLDER_THAN_S = 600.0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", metavar="URL", help="the checkpoint whose lock (URL.lock) to remove")
    parser.add_argument("--older-than", type=float, default=DEFAULT_OLDER_THAN_S, metavar="SECONDS",
                        help=f"remove the lock only if it is at least this old (default {DEFAULT_OLDER_THAN_S:g})")


def run(args: argparse.Namespace) -> int:
    target = Storage(args.url, storage_options(args))
    age = unlock(target, args.older_than)
    if args.json:
        print_json({"url": target.url, "lock": f"{target.url}.lock", "removed": age is not None, "age_s": age})
    elif age is None:
        print(f"{target.url}.lock: no lock held; nothing to remove")
    else:
        print(f"removed {target.url}.lock, created {age:.0f} s ago")
    return EXIT_OK
