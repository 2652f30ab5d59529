"""moeprune: keep only the experts a task needs."""

from .curve import curve, write_curve
from .errors import FormatVersionError, MoepruneError, PromptError, UnsupportedModelError
from .estimate import Estimate, estimate
from .evaluate import EvalResult, evaluate
from .exporter import export
from .pattern import Diagnostics, Pattern, diagnose, select_union
from .profiler import profile
from .profiles import CRITERIA, Profile
from .routers import get_adapter, supported
from .slim import load_slim
from .target import BudgetReport, BudgetSearch, select_for_target
from .version import __version__

__all__ = [
    "BudgetReport",
    "BudgetSearch",
    "CRITERIA",
    "Diagnostics",
    "Estimate",
    "EvalResult",
    "estimate",
    "evaluate",
    "Pattern",
    "diagnose",
    "export",
    "load_slim",
    "select_union",
    "FormatVersionError",
    "MoepruneError",
    "Profile",
    "PromptError",
    "UnsupportedModelError",
    "__version__",
    "get_adapter",
    "profile",
    "select_for_target",
    "supported",
    "curve",
    "write_curve",
]
