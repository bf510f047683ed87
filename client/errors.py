"""Errors raised by the client: the server's error code and message, or a transport failure."""


class PiggyError(Exception):
    """The server answered with an error (`code` is its snake_case error code)."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(f"{status} {code}: {message}")
        self.status, self.code, self.message = status, code, message
