"""The pattern store: named expert patterns on disk, retrieved from raw queries by FAISS search."""

from .signature import KINDS, embed
from .store import FLAT_LIMIT, Entry, Match, PatternStore, check_name

__all__ = ["FLAT_LIMIT", "KINDS", "Entry", "Match", "PatternStore", "check_name", "embed"]
