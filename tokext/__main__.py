"""``python -m tokext`` runs the command-line interface."""

from tokext.cli import main

raise SystemExit(main())
