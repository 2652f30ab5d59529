"""Errors moeprune raises for bad input. Each message names the problem and what to do."""

from __future__ import annotations


class MoepruneError(ValueError):
    """Base class: bad input a user can fix (the CLI prints it as one line)."""


class UnsupportedModelError(MoepruneError):
    """The model is not MoE, or its architecture has no adapter."""


class FormatVersionError(MoepruneError):
    """An artefact was written by a newer moeprune than this one."""


class PromptError(MoepruneError):
    """A prompt file is missing, empty or malformed."""
