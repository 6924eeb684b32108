"""The failures the project expects: input it refuses, with a message saying why."""


class UsageError(ValueError):
    """Input the project refuses (a bad option, a dataset and config that disagree, a
    file of the wrong kind). The command line prints it as one line; any other exception
    is a bug and shows its traceback."""
