"""The one error type for bad input: the library raises it, and every command (`lorpa.cli.run_cli`) turns it
into a single line naming the problem and a non-zero exit, never a traceback."""


class InputError(ValueError):
    """Bad input from the user (an option, a flag, a file, a model that does not fit): the message says what is
    wrong and what to do. A ValueError, so code that catches those keeps working."""
