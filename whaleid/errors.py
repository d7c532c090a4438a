"""The one exception type for problems in the user's data or settings.

Stages raise `UserError` with one sentence naming the file, row or key; the numbered scripts
print it without a traceback and exit with status 2.
"""


class UserError(Exception):
    """A problem the user can fix: bad data, a bad config value, a missing input artifact."""
