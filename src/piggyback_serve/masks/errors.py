"""The exceptions masks/ raises; the server maps them to HTTP codes in one place."""


class MasksError(Exception):
    """Base class of every error raised by masks/."""


class BackboneError(MasksError):
    """A backbone can't be built or its weights can't be found."""


class ArtifactError(MasksError):
    """A task artifact is malformed or does not fit the backbone; `field` names what."""

    def __init__(self, field: str, message: str):
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
