"""``python -m peftfast.tools.costmodel``: the cost model's report (see ``cli.main``)."""
from .cli import main

raise SystemExit(main())
