"""Errors that entry points turn into one clear line (`error: ...`) and a non-zero exit."""


class HPAError(Exception):
    """Base class: the message names the file/field/key and what was expected."""


class DataError(HPAError, ValueError):
    """Bad input data: CSVs, images, layouts, prediction files."""


class StoreError(HPAError):
    """Object store problems: credentials, missing bucket/key, integrity, escaping keys."""


class ConfigError(HPAError, ValueError):
    """Bad options or parameters (negative learning rate, unknown architecture, ...)."""
