"""The package version (a module of its own: the pipeline's handshake reads it without
importing the whole API)."""

__version__ = "0.1.0"
