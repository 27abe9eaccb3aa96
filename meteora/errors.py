"""The exceptions meteora raises for user mistakes, in one place: each names the file, field, adapter or request
value that is wrong. All but StoreError and GenerationFailed are ValueErrors, so callers can catch them broadly;
GenerationFailed is the server's own failure, not the request's."""

__all__ = ["AdapterError", "Busy", "CheckpointError", "GenerationFailed", "InvalidRequest", "ManifestError", "PromptTooLong", "RegistryError", "RequestError", "StoreError", "UnknownExpert"]


class AdapterError(ValueError):
    """An adapter cannot be used: the message names the adapter and what is wrong with it."""


class CheckpointError(ValueError):
    """A MeteoRA checkpoint cannot be loaded: the message names the file or field and the problem."""


class ManifestError(ValueError):
    """The manifest is malformed: the message names the file, the adapter and the field."""


class RegistryError(ValueError):
    """The registry cannot be read or committed: the message names the registry and the problem."""


class StoreError(OSError):
    """An object could not be read or written: the message names the URI and the cause."""


class RequestError(ValueError):
    """A generation request cannot be served; `param` names the request field, `code` says what is wrong.
    The subclasses tell a server which status to answer (serve_app/errors.py maps them to OpenAI's 4xx)."""

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message, self.param, self.code = message, param, code


class InvalidRequest(RequestError):
    """Malformed or out-of-range values (HTTP 400)."""


class UnknownExpert(RequestError):
    """A model or expert name the fused model does not have (HTTP 404)."""


class PromptTooLong(RequestError):
    """The prompt is above the server's limit (HTTP 413)."""


class Busy(RequestError):
    """Too many requests wait already: retry later (HTTP 429)."""


class GenerationFailed(RuntimeError):
    """The generation engine failed while serving a request (not the request's fault: HTTP 503); it lives on."""
