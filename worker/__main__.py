"""``python -m worker`` is the same as the ``riverline`` command."""

from __future__ import annotations

import sys

from worker.cli import main

if __name__ == "__main__":
    sys.exit(main())
