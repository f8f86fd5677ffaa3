"""layercake: run large language models on hardware too small to hold them."""

from layercake.errors import LayercakeError
from layercake.llm import LLM, load

__version__ = "0.1.0"
__all__ = ["LLM", "LayercakeError", "load", "__version__"]
