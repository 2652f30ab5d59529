"""Serving pruned MoE models: one backbone, routed experts swapped in per request (`ExpertPool`)."""

from .residency import ExpertPool, Lease

__all__ = ["ExpertPool", "Lease"]
