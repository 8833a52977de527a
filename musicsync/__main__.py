"""``python -m musicsync``: the command line."""

from .cli import main

raise SystemExit(main())
