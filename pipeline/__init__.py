"""layertap: transfer learning from the layers you choose.

Stage one extracts pooled activations of named layers of a frozen pretrained CNN into
HDF5 feature stores (:mod:`pipeline.extract`, :mod:`pipeline.store`); later stages train
classifiers on those stores without touching an image again.
"""

__version__ = "0.1.0"


class LayertapError(Exception):
    """An error a user can act on: its message names the input and the fix."""
