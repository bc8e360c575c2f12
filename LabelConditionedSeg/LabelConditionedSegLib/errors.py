"""One exception type for everything a user can fix; the CLI prints it as one line."""


class LCSError(Exception):
    """Bad input or environment: the message says what is wrong and what to do."""


class Cancelled(LCSError):
    """The user cancelled a run; nothing was written."""

    def __init__(self, message: str = "cancelled by the user; nothing was changed"):
        super().__init__(message)


def itk_message(error: RuntimeError) -> str:
    """What a failed ITK filter says, for a one-line message: ITK's exception text names the source file and line
    first and its message last, so the last line, cut to 200 characters."""
    return (str(error).strip().splitlines() or [""])[-1][:200]


def one_line(error: Exception) -> str:
    """A failure on one line: an LCSError or OSError says what to do; anything else also names its type."""
    if isinstance(error, OSError):
        text = f"{error.strerror or error} ({error.filename or 'output'})"
    else:
        text = itk_message(error) if isinstance(error, RuntimeError) else (str(error).strip().splitlines() or [""])[0]
        if not isinstance(error, LCSError):
            text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return text[:300]
