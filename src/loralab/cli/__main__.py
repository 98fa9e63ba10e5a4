"""``python -m loralab.cli ...``: the same as the ``loralab`` console script (the study's
local backend starts its run processes this way)."""

from loralab.cli import main
from loralab.ending import end_process

end_process(main())
