"""``python -m loralab.cli ...``: the same as the ``loralab`` console script (the study's
local backend starts its run processes this way)."""

from loralab.cli import main

raise SystemExit(main())
