"""``python -m cncad`` runs the command line."""

from cncad.cli import main

raise SystemExit(main())
