from .generate import generate_text
from .perplexity import perplexity

__all__ = ["perplexity", "generate_text"]
