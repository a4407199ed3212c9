"""``python -m rr_middleware --config gateway.toml``: the gateway command (see gateway.py)."""

from __future__ import annotations

import sys

from .gateway import main

if __name__ == "__main__":  # worker processes re-import this module: they must not run it
    sys.exit(main())
