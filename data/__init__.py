"""Sources and demo datasets. The format modules register themselves with data.sources on import."""

from featurebank.data import tables, webdataset, text  # noqa: F401 I001 - the order of --source-format's values
