"""layercake: run large language models on hardware too small to hold them."""

from layercake.errors import LayercakeError
from layercake.llm import LLM, load
from layercake.options import Options
from layercake.version import __version__

__all__ = ["LLM", "LayercakeError", "Options", "load", "__version__"]
