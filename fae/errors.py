"""The one exception type for a user's mistake: bad input, missing files, a wrong setting.

Raise `UserError` with a message that names the bad value and says how to fix it; `fae.cli.main`
prints it as one line (`fae: error: ...`) and exits with status 2 instead of showing a traceback.
Internal invariants stay plain asserts.
"""

from __future__ import annotations


class UserError(Exception):
    """A mistake the user can fix; its message is shown alone, as one line."""
