"""Errors of the model package that commands print as one line."""


class WeightsError(ValueError):
    """A weights file that cannot be read, or does not fit the model: says what and what to do."""
