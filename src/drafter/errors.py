"""Errors a user can read: every failure the commands report is a DrafterError."""


class DrafterError(Exception):
    """A failure with a one-line message meant for the user (no traceback)."""


class NotRootError(DrafterError):
    def __init__(self, what: str) -> None:
        super().__init__(f"{what} must run as root (try: sudo {what})")
