"""One exception type for every problem the user can fix.

The CLI turns a UserError into exit code 2 and a single line on stderr (no traceback). Raise it with a message that
names what is wrong and how to fix it, before any expensive work starts.
"""


class UserError(Exception):
    """Bad input or environment: exit code 2, one clear line."""
