"""The appliance's error tree.

Every error carries a message that says what happened and what to do. They are turned into
user-facing output only at the edges: `gr.Error` in `ui/`, an exit code in `cli.py`, an
OpenAI-shaped JSON error in the gateway.
"""

from __future__ import annotations


class ApplianceError(Exception):
    """Base class: `str(err)` is a complete sentence for the user ("what happened; what to do")."""

    exit_code = 1

    def __init__(self, message: str, *, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} {self.hint}".strip() if self.hint else self.message


class SettingsError(ApplianceError):
    """A settings key, value or file is wrong."""

    exit_code = 2


class DockerUnavailableError(ApplianceError):
    """The Docker engine cannot be reached or refused an operation."""

    exit_code = 3


class ImagePullError(ApplianceError):
    """Pulling the engine image failed."""

    exit_code = 4


class WeightsError(ApplianceError):
    """Downloading or finding the model weights failed."""

    exit_code = 5


class EngineError(ApplianceError):
    """The engine failed to start, crashed, or an engine operation is not possible now."""

    exit_code = 6


class PortInUseError(ApplianceError):
    """A port the appliance needs is taken."""

    exit_code = 7


class HardwareError(ApplianceError):
    """The hardware cannot run what was asked (no GPU, not enough memory, ...)."""

    exit_code = 8


class BadInputError(ApplianceError):
    """Input from a user or client is invalid (an image, a request, a key)."""

    exit_code = 9
