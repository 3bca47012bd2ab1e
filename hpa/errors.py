"""Errors that entry points turn into one clear line (`error: ...`) and a non-zero exit."""


def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (at most `limit` characters; "" when it has none), for the
    `(<Type>: <first line>)` part of a one-line error."""
    text = str(exc).strip()
    return text.splitlines()[0][:limit] if text else ""


class HPAError(Exception):
    """Base class: the message names the file/field/key and what was expected."""


class DataError(HPAError, ValueError):
    """Bad input data: CSVs, images, layouts, prediction files."""


class StoreError(HPAError):
    """Object store problems: credentials, missing bucket/key, integrity, escaping keys."""


class ConfigError(HPAError, ValueError):
    """Bad options or parameters (negative learning rate, unknown architecture, ...)."""
