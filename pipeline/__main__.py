"""``python -m pipeline COMMAND ...`` is the same as ``layertap COMMAND ...``."""

from pipeline.cli import entry

if __name__ == "__main__":  # decoding worker processes import this module again
    entry()
