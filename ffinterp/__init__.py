"""ffinterp: find and explain attention glitches in flip-flop language models.

Follows Liu et al., "Exposing Attention Glitches with Flip-Flop Language Modeling"
(arXiv 2306.00946).
"""

__version__ = "0.1.0"

from ffinterp.analysis.glitches import find_glitches  # noqa: E402, F401
from ffinterp.errors import FFInterpError  # noqa: E402
from ffinterp.hooked import FFLModel, load_model  # noqa: E402, F401
from ffinterp.language import FFLError, Mix, from_text, reads, sample, to_text, validate  # noqa: E402

__all__ = [
    "FFInterpError",
    "FFLError",
    "Mix",
    "from_text",
    "reads",
    "sample",
    "to_text",
    "validate",
    "__version__",
]
