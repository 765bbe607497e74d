"""Exceptions raised by w2sd. Every message names the field, key or file that is wrong."""


class W2SDError(Exception):
    """Base class of w2sd's own errors."""


class CheckpointError(W2SDError, ValueError):
    """A checkpoint or config file is missing, corrupt, of another architecture, or has mismatched keys."""


class LoRAError(W2SDError, ValueError):
    """A LoRA file does not fit the model it is applied to."""


class ConfigError(W2SDError, ValueError):
    """A user-supplied config (CASE.json, scheduler config, CLI option) is invalid."""


class OutputExistsError(W2SDError, FileExistsError):
    """An output would overwrite a user's existing results without --overwrite."""
