"""``python -m shardstore``: the same command line as the ``shardstore`` console script."""

import sys

from shardstore.cli import main

sys.exit(main())
