"""What the engine runs for one extraction, whatever the modality: a backbone's prepare step (images:
features.image_prepare; texts: features.text) turns the job into an :class:`Execution`, and the engine
(features.engine) runs it between its plan (what to embed) and its commit (the store's merge)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Execution:
    """``run(recorder)`` embeds the job's samples, handing rows and failures to the recorder
    (features.engine.Recorder), and returns how it ran (the result's ``layout``)."""

    run: Callable[[object], str]
    desc: str  # the progress bar's description
    unit: str  # what the progress bar counts: img, text
    settings: dict = field(default_factory=dict)  # the options the forward pass ran with (the run report)
    threaded: bool = True  # the recorder writes through a writer thread (not with replica processes)
    store_runtime: str | None = None  # recorded in the store: which runtime, at which precision, wrote rows
