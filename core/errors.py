"""The one exception type for bad user input: the CLI prints its message and exits with code 2."""


class UserError(Exception):
    """Bad input (path, config key, image, request): reported as one clear line, no traceback."""
