"""``python -m fusedattn``: the same command line as the ``fusedattn`` script."""
from .cli import main

raise SystemExit(main())
