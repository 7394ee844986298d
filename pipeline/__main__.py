"""``python -m pipeline COMMAND ...`` is the same as ``layertap COMMAND ...``."""

import sys

from pipeline.cli import main

sys.exit(main())
