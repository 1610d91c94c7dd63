"""``python -m synth.ldm ldm-train|ldm-sample ...`` (the same commands as ``python -m synth``)."""

import sys

from synth.ldm.cli import main

sys.exit(main())
