"""The one exception type for problems with the user's input (files, flags, data)."""


class GGTrainError(Exception):
    """Bad input that the user can fix: the CLI prints it as one line and exits with code 2.

    The message names the file (or flag) and what is wrong with it.
    """
