"""alignkit: from a pretrained language model to an aligned assistant."""

__version__ = "0.1.0"
