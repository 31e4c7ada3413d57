"""The one error every bad setting raises: it names the field, the value and what is allowed."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the allowed values."""
