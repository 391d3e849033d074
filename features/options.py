"""The options of one extraction, as one typed object: what :func:`features.engine.extract` and
:func:`features.sweep.sweep` take beside the source, the backbone and the store folder.

The user-facing ones are declared once, with their help text and limits, in ``pipelines/params.py``
(``EngineOptions``: the CLI flag, the ``--config`` key and the flow parameter); ``EngineOptions.engine()``
builds this object from them, and a test checks that every field of both agrees on its name and default.
The others (``lock_timeout``, the part sizes, ``progress``, ``say``, ``layout``, ``calibration_samples``)
are set by code: tests, shards, the Python API. Nothing heavy is imported here (no torch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field

from featurebank.features.choices import DEFAULT_AMP, DEFAULT_DECODER, LONG_TEXT
from featurebank.features.store import DTYPES


@dataclass(frozen=True)
class ExtractOptions:
    """How a source is embedded. Each field means what the option of the same name means on the command
    line (``featurebank extract --help``); see :func:`features.engine.extract` for the others."""

    dataset: str | None = None  # the dataset name in the store's file name (default: the source's name)
    batch_size: int | None = None  # None: chosen by the runtime and device
    device: str | None = None  # None/auto: CUDA, then MPS, then the CPU (picked once per extraction)
    workers: int | None = None  # CPU: replica processes; GPU: loader workers; None: from the machine
    dtype: str = DTYPES[0]
    content_hash: bool = False
    retry_failures: bool = False
    allow_damaged: bool = False
    amp: str = DEFAULT_AMP
    compile: bool = False
    decoder: str = DEFAULT_DECODER
    runtime: str = "auto"
    precision: str = "f32"
    long_text: str = LONG_TEXT[0]  # used where the backbone is built from its name (extract of a name, sweep)
    calibration_samples: int | None = None  # int8: NNCF's calibration samples (None: CALIBRATION_SAMPLES)
    lock_timeout: float | None = None
    rows_per_part: int = 512
    seconds_per_part: float = 10.0
    progress: bool = True
    say: Callable[[str], None] = print
    layout: object | None = field(default=None)  # a features.device.Layout forced instead of the automatic one

    def but(self, **changes) -> ExtractOptions:
        """A copy with ``changes``; an unknown name raises TypeError naming it."""
        unknown = sorted(set(changes) - {f.name for f in dataclasses.fields(self)})
        if unknown:
            raise TypeError(f"unknown extraction option(s) {', '.join(unknown)}: the options are "
                            f"{', '.join(f.name for f in dataclasses.fields(self))}")
        return dataclasses.replace(self, **changes) if changes else self

    @classmethod
    def of(cls, options: ExtractOptions | None = None, **changes) -> ExtractOptions:
        """``options`` (default: all defaults) with ``changes``: the keyword shorthand of extract and sweep."""
        return (options or cls()).but(**changes)

    def settings(self) -> dict:
        """The user-facing options, as the store's report records them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.name not in ("say", "layout", "progress")}
