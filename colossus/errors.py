"""The one exception type for mistakes a user can fix (bad config, flag, path, checkpoint).

It carries a one-line message that names what is wrong and how to fix it; only the CLI turns it
into an exit code, so library code stays testable and never calls sys.exit.
"""


class UserError(Exception):
    """A problem in the user's input, reported as one line without a traceback."""
