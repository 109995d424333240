"""The Ray job entry: ``ray job submit -- python -m regrow.launch.ray_job --workers N [regrow ray flags]``.

Inside a Ray job the cluster is the one the job runs on, so this is ``regrow ray --address auto``."""

from __future__ import annotations

import sys

from regrow.launch.cli import main

if __name__ == "__main__":
    sys.exit(main(["ray", "--address", "auto", *sys.argv[1:]]))
