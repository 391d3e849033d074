"""Sources and demo datasets. The format modules register themselves with data.sources on import."""

from featurebank.data import tables, text, webdataset  # noqa: F401
