"""LaRoSA: layerwise rotated sparse activation (reference implementation)."""

from .errors import LarosaError
from .models import load_model, resolve_model

__version__ = "0.1.0"
__all__ = ["LarosaError", "load_model", "resolve_model", "__version__"]
