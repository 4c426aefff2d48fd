"""Exception types. Each subclasses the built-in it means, so callers can catch either."""


class HFQuantError(Exception):
    """Base class for every error hfquant raises on purpose."""


class ConfigError(HFQuantError, ValueError):
    """A configuration value is wrong; the message names the field, the value and what is accepted."""


class CalibrationError(HFQuantError, ValueError):
    """Calibration data is missing, unreadable or too short for the requested samples."""


class UnsupportedModelError(HFQuantError, ValueError):
    """The model's structure cannot be quantized with the requested scheme."""


class FormatError(HFQuantError, ValueError):
    """A checkpoint cannot be written in (or read from) another tool's layout; the message says why and what to do."""
