"""``python -m pipeline COMMAND ...`` is the same as ``layertap COMMAND ...``."""

import sys

from pipeline.cli import main

if __name__ == "__main__":  # decoding worker processes import this module again
    sys.exit(main())
