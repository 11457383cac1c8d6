"""The errors peftfast raises for bad configurations and adapter operations.

They live at the bottom of the package so that every layer can raise and catch them (save/load in
``utils`` catches what the tuners raise) without importing upward. All are ValueErrors, as PEFT's
errors for the same situations are. ``peftfast.config`` re-exports ConfigError and
``peftfast.tuners.tuners_utils`` re-exports AdapterError, where users have always found them.
"""


class ConfigError(ValueError):
    """An adapter configuration is invalid or cannot be used by peftfast."""


class AdapterError(ValueError):
    """An adapter name or adapter operation is not valid for this model."""
