"""The HDF5 feature store: one file per (dataset, backbone configuration). The only package that knows HDF5.

- ``schema``: the format, the configuration that names a store (``StoreConfig``, its fingerprint, the int8
  recipe as data) and how chunks are checksummed;
- ``reader``: opening a store, damage checks, the whole store (``read_features``), its index without
  embeddings (``read_index``), its configuration as data (``read_config``), embeddings in row blocks
  (``StoreReader``), the check of a joined store's shards;
- ``writer``: ``StoreWriter``, which commits parts under a lock and merges them into the store;
- ``shards``: ``join_shards``, one store over shard stores without copying;
- ``files``: ``atomic_h5``, the all-or-nothing HDF5 write (the one atomic-write idiom of data.files).

Everything outside this package reads and writes stores through the names exported here; importing
``h5py`` anywhere else in featurebank fails ``lint-imports`` (pyproject.toml).
"""

from featurebank.data.files import atomic_write
from featurebank.features.store.files import atomic_h5
from featurebank.features.store.reader import (
    Damage, Embeddings, Features, StoreReader, check_store, damage_error, embedding_shape, open_store,
    LabelColumns, read_config, read_features, read_index, read_label_columns, read_rows,
    read_string_column, recorded_config, row_ranges, scan_rows, store_damage,
    strings, verify_shards,
)
from featurebank.features.store.schema import (
    CALIBRATION_SAMPLES, CHECKSUM, CONFIG_VERSION, DEFAULT_STORE_DIR, DTYPES, FORMAT_VERSION, READABLE_FORMATS,
    ROWS_PER_CHUNK, STORE_FORMAT, STR, StoreConfig, StoreError, calibration_samples, checksummed, count_notes,
    int8_recipe_data, library_versions, recipe_as_data, recipe_fingerprinted, store_path, strings_crc,
)
from featurebank.features.store.shards import join_shards
from featurebank.features.store.writer import Match, StoreIndex, StoreWriter, write_failures, write_strings

__all__ = [
    "CALIBRATION_SAMPLES", "CHECKSUM", "CONFIG_VERSION", "DEFAULT_STORE_DIR", "DTYPES", "FORMAT_VERSION",
    "READABLE_FORMATS", "ROWS_PER_CHUNK", "STORE_FORMAT", "STR", "Damage", "Embeddings", "Features", "LabelColumns", "Match",
    "StoreConfig",
    "StoreError", "StoreIndex", "StoreReader", "StoreWriter", "atomic_h5", "atomic_write", "calibration_samples",
    "check_store", "checksummed", "count_notes", "damage_error", "embedding_shape", "int8_recipe_data",
    "join_shards", "library_versions", "open_store", "read_config", "read_features", "read_index", "read_label_columns",
    "read_rows", "read_string_column",
    "recipe_as_data", "recipe_fingerprinted", "recorded_config", "row_ranges", "scan_rows", "store_damage",
    "store_path", "strings", "strings_crc", "verify_shards", "write_failures", "write_strings",
]
