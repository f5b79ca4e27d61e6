"""LaRoSA: layerwise rotated sparse activation (reference implementation).

The data flow: load -> calibrate (statistics -> rotations) -> apply (official | fused | topk, with a
sparsity plan) -> evaluate / run -> save / load.
"""

from .api import apply, cached_rotations, calibrate, evaluate_ppl, sparsify, sparsity_report
from .calibrate import CalibrationConfig, Rotations
from .errors import LarosaError
from .io import load, save
from .models import load_model, resolve_model
from .sparsity import SparsityPlan, parameter_weighted
from .search import plan_for_target, search_split
from .transform import LarosaConfig

__version__ = "0.1.0"
__all__ = ["search_split", "plan_for_target", "LarosaError", "load_model", "resolve_model", "calibrate", "cached_rotations", "apply",
           "save", "load", "evaluate_ppl", "sparsify", "sparsity_report", "SparsityPlan",
           "parameter_weighted", "LarosaConfig", "Rotations", "CalibrationConfig", "__version__"]
