"""Errors that reach a user: each names the problem and, where possible, what to do next."""


class MedSAM3Error(Exception):
    """Base class of every error the engine reports to a user (CLI exit code 2)."""


class InputError(MedSAM3Error, ValueError):
    """The input volume, prompts or options are unusable (wrong file, dimensions, NaNs...)."""


class OutputError(MedSAM3Error):
    """An output cannot be written: a file where a folder should be, a read-only folder, a full disk,
    or a value the output format cannot hold. Nothing partial is left behind."""


class ModelLoadError(MedSAM3Error):
    """The model could not be found or loaded (unknown path or hub id, gated repo, offline...)."""


class Cancelled(MedSAM3Error):
    """The caller cancelled a running job through its :class:`~MedicalSAM3Core.common.progress.CancelToken`."""
