"""The engine's option values and defaults, with no heavy import (no torch): the command line's
validation and ``--help`` read them from here, so a bad value is answered in a fraction of a second.
The modules that implement each option import its names from here (one declaration)."""

DEFAULT_BACKBONE = "efficientnet_lite0"  # features.backbones
DEFAULT_TEXT_BACKBONE = "minilm"  # features.text
DEFAULT_BACKBONES = {"image": DEFAULT_BACKBONE, "text": DEFAULT_TEXT_BACKBONE}  # by the source's modality
DECODERS = ("fast", "plain")  # features.decode
DEFAULT_DECODER = DECODERS[0]
AMP_MODES = ("auto", "bf16", "fp16", "fp32")  # features.device (CUDA autocast)
DEFAULT_AMP = AMP_MODES[0]
RUNTIMES = ("auto", "torch", "openvino")  # features.runtimes
PRECISIONS = ("f32", "bf16", "int8")
TEXT_PRECISIONS = ("f32", "bf16")  # features.text: a sentence encoder computes in these
LONG_TEXT = ("truncate", "mean")  # features.text: what a text longer than the maximum length becomes
CALIBRATION_SAMPLES = 300  # int8: the train-split samples NNCF calibrates on, unless told otherwise
