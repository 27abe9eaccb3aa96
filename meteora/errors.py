"""Exceptions raised for user mistakes. Both are ValueErrors so callers can catch either broadly."""


class AdapterError(ValueError):
    """An adapter cannot be used: the message names the adapter and what is wrong with it."""


class CheckpointError(ValueError):
    """A MeteoRA checkpoint cannot be loaded: the message names the file or field and the problem."""
