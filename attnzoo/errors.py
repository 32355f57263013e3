"""The exceptions attnzoo raises. Every message says what was wrong and where."""

from __future__ import annotations


class AttnZooError(Exception):
    """Base class of every error that attnzoo raises on purpose."""


class SpecError(AttnZooError, ValueError):
    """A spec (YAML, dict or ModelSpec) is invalid, or cannot be built."""


class WeightsError(AttnZooError):
    """Weights are missing, refused (pickle), corrupt, or do not fit the model."""
