"""Errors for bad user input. The CLI prints them as one clear line instead of a traceback."""


class InputError(ValueError):
    """A file, directory, dataset, cache or argument that cannot be used, named in the message."""
