"""The error of a dataset path that cannot be read at all, shared by the list readers and the Hub fetch."""


class DatasetLayoutError(ValueError):
    """The dataset path itself is unusable (no list found, unreadable metadata, a Hub repo that cannot be had)."""
