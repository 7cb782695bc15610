"""The one exception type for a user's mistake: bad input, missing files, a wrong setting.

Raise `UserError` with a message that names the bad value and says how to fix it; `fae.cli.main`
prints it as one line (`fae: error: ...`) and exits with status 2 instead of showing a traceback.
Internal invariants stay plain asserts.
"""

from __future__ import annotations

from pathlib import Path


class UserError(Exception):
    """A mistake the user can fix; its message is shown alone, as one line. The newest one raised is
    kept in `UserError.latest`: jsonargparse turns an error raised in a class's constructor into its
    own, quoting only the message, and fae.cli.main recognises it by that."""

    latest: UserError | None = None

    def __init__(self, *args: object) -> None:
        super().__init__(*args)
        UserError.latest = self


def require_positive(owner: str, **values: int | float) -> None:
    """A UserError naming the first of `values` that is not > 0, e.g. a net's width of 0."""
    for name, value in values.items():
        if not value > 0:
            raise UserError(f"{owner}: {name} must be > 0, got {value}")


def make_folder(path: Path, what: str, fix: str) -> None:
    """mkdir -p, or a UserError saying why `what` (e.g. "the run folder") cannot be made, and `fix`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise UserError(f"cannot make {what} {path}: a file is in the way ({fix})") from None
    except OSError as err:
        raise UserError(f"cannot make {what} {path}: {err.strerror} ({fix})") from None


def short_reason(err: BaseException) -> str:
    """The last line of an exception's message (or its type's name): the cause to quote in a UserError."""
    text = str(err).strip()
    return text.splitlines()[-1] if text else type(err).__name__


def user_message(err: UserError) -> str:
    """The message of `err`. A UserError raised in a DataLoader worker process reaches the main process
    re-raised with the worker's traceback as its message; its own message is that traceback's last line."""
    if "Original Traceback" in str(err):
        return short_reason(err).split(f"{UserError.__name__}: ", 1)[-1]
    return str(err).strip()
