"""Errors raised by the data engine. Each one names what is wrong and where."""
from __future__ import annotations


class DataError(Exception):
    """Base class of the data engine's errors."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset directory (or its `dataset_info.json`) does not exist."""

    def __init__(self, path, detail: str = "directory does not exist"):
        self.path = str(path)
        super().__init__(f"no RLDS dataset at {self.path}: {detail}")

    def __str__(self) -> str:  # FileNotFoundError would otherwise format (errno, strerror)
        return self.args[0]


class UnknownDatasetError(DataError, KeyError):
    """A dataset or mixture name that is not in the registry."""

    def __init__(self, name: str, known, kind: str = "dataset"):
        self.name = name
        self.known = sorted(known)
        super().__init__(f"unknown {kind} {name!r}; known {kind}s: {', '.join(self.known)}")

    def __str__(self) -> str:  # KeyError would otherwise quote the message
        return self.args[0]


class MissingFeatureError(DataError, KeyError):
    """A feature key that the dataset's standardization needs is not in the dataset."""

    def __init__(self, key: str, dataset: str, available=()):
        self.key = key
        self.dataset = dataset
        message = f"feature {key!r} is missing from dataset {dataset!r}"
        if available:
            message += f"; its step features are: {', '.join(sorted(available))}"
        super().__init__(message)

    def __str__(self) -> str:
        return self.args[0]


class CorruptShardError(DataError):
    """A TFRecord shard that is truncated or corrupt (a record fails its checksum or length)."""

    def __init__(self, path: str, records_read: int, records_expected: int, detail: str = ""):
        self.path = str(path)
        self.records_read = records_read
        self.records_expected = records_expected
        message = (f"corrupt or truncated shard {self.path}: read {records_read} of {records_expected} records"
                   + (f" ({detail})" if detail else "")
                   + "; pass skip_bad_records=True to skip bad records and continue")
        super().__init__(message)


class EmptyDatasetError(DataError):
    """A dataset, split or mixture that would yield no frames at all."""
