"""Exception types: each names the bad value and what is allowed, so users can fix input fast."""


class CpqError(ValueError):
    """Base class of every error cpq raises on bad input."""


class ConfigError(CpqError):
    """A configuration field has a bad type or value."""


class DataError(CpqError):
    """A data set name, root or content is unusable."""


class UnsafeArchiveError(DataError):
    """An archive member would land outside the extraction folder."""


class ModelError(CpqError):
    """Unknown model name or mismatched architecture/class count."""


class CheckpointError(CpqError):
    """A checkpoint file is missing, corrupted or does not match the requested model."""


class TrainingError(CpqError):
    """Training diverged (non-finite loss) or cannot continue with the given settings."""
