"""``python -m regrow.checkpoint.node``: runs one node's snapshot process (see ``process.py`` and
docs/snapshot-protocol.md)."""

import sys

from regrow.checkpoint.node.process import main

sys.exit(main())
