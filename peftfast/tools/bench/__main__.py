"""``python -m peftfast.tools.bench``: the same as ``peftfast bench`` (see ``cli.main``)."""
from .cli import main

raise SystemExit(main())
