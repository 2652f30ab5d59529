"""moeprune: keep only the experts a task needs."""

from .errors import FormatVersionError, MoepruneError, PromptError, UnsupportedModelError
from .profiler import profile
from .profiles import CRITERIA, Profile
from .routers import get_adapter, supported
from .version import __version__

__all__ = [
    "CRITERIA",
    "FormatVersionError",
    "MoepruneError",
    "Profile",
    "PromptError",
    "UnsupportedModelError",
    "__version__",
    "get_adapter",
    "profile",
    "supported",
]
