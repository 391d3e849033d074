"""The engine's machinery without a model: the layout rule, work chunks, the writer thread, the
out-of-memory back-off, JPEG headers and the progress bar's bottleneck."""

from __future__ import annotations

import io
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image

# Internals, on purpose: the engine's machinery without a model (layout rule, chunks, writer thread, back-off):
# internals by design.
from featurebank.features.backbones import Preprocessing
from featurebank.features.decode import Decoder
from featurebank.features.images import jpeg_header, jpeg_orientation
from featurebank.features.engine import Recorder, WriterThread
from featurebank.features.executors import chunks as _chunks
from featurebank.features.runtimes.torch_runtime import Forward, is_oom
from featurebank.features.device import choose_layout, pick_amp

CPU, CUDA = torch.device("cpu"), torch.device("cuda")


# --- the layout rule


def test_cpu_layout_is_one_single_threaded_replica_per_core():
    lay = choose_layout(CPU, 10_000, 32, cores=2)
    assert (lay.replicas, lay.threads, lay.loader_workers) == (2, 1, 0)
    lay = choose_layout(CPU, 10_000, 32, cores=16)
    assert (lay.replicas, lay.threads) == (16, 1)


def test_cpu_layout_runs_in_process_with_one_core_or_few_images():
    assert choose_layout(CPU, 10_000, 32, cores=1).replicas == 0
    lay = choose_layout(CPU, 20, 32, cores=4)  # one batch: no point starting processes
    assert (lay.replicas, lay.threads) == (0, 4)
    assert choose_layout(CPU, 100, 32, cores=4).replicas == 4


def test_cpu_layout_obeys_workers():
    assert choose_layout(CPU, 10_000, 32, workers=0, cores=8).replicas == 0
    lay = choose_layout(CPU, 10_000, 32, workers=4, cores=8)
    assert (lay.replicas, lay.threads) == (4, 2)


def test_cpu_layout_is_capped_by_memory(monkeypatch):
    import featurebank.features.device as rt

    monkeypatch.setattr(rt, "available_memory", lambda: 2 * 2**30)
    model = torch.nn.Linear(2**14, 2**12)  # 256 MiB of weights
    assert choose_layout(CPU, 10_000, 32, model=model, cores=64).replicas < 64


def test_gpu_layout_is_one_process_with_loader_workers_and_device_decoding():
    lay = choose_layout(CUDA, 10_000, 256, cores=16)
    assert lay.replicas == 0 and lay.gpu_decode and 1 <= lay.loader_workers <= 8
    assert choose_layout(CUDA, 10_000, 256, workers=3, cores=16).loader_workers == 3


def test_amp_choice():
    assert pick_amp(CPU, "auto") is None
    assert pick_amp(CUDA, "fp32") is None
    assert pick_amp(CUDA, "fp16") is torch.float16
    assert pick_amp(CUDA, "bf16") is torch.bfloat16
    with pytest.raises(ValueError):
        pick_amp(CPU, "int8")


@pytest.mark.parametrize("n,batch,replicas", [(0, 32, 2), (1, 32, 2), (100, 32, 2), (1000, 16, 4), (77, 8, 3)])
def test_chunks_cover_every_image_once_and_shrink_at_the_end(n, batch, replicas):
    chunks = _chunks(n, batch, replicas)
    covered = [i for a, b in chunks for i in range(a, b)]
    assert covered == list(range(n))
    assert all(b - a <= batch for a, b in chunks)
    if n > replicas * batch:
        assert chunks[-1][1] - chunks[-1][0] < batch


# --- the writer thread


class _FakeWriter:
    def __init__(self, fail_after=None, delay=0.0):
        self.rows, self.failures, self.fail_after, self.delay = [], [], fail_after, delay
        self.threads = set()

    def add(self, ids, emb, content):
        self.threads.add(threading.current_thread().name)
        time.sleep(self.delay)
        if self.fail_after is not None and len(self.rows) >= self.fail_after:
            raise OSError("disk full")
        self.rows.extend(zip(ids, emb, content))

    def add_failures(self, ids, reasons, content):
        self.failures.extend(zip(ids, reasons, content))


def test_writer_thread_writes_everything_in_the_background():
    w = _FakeWriter(delay=0.002)
    t = WriterThread(depth=2)
    for k in range(20):
        t.put(w.add, [f"id{k}"], np.ones((1, 4), np.float32) * k, [f"c{k}"])
    t.put(w.add_failures, ["bad"], ["not an image"], ["c"])
    t.close()
    assert [r[0] for r in w.rows] == [f"id{k}" for k in range(20)]
    assert w.failures == [("bad", "not an image", "c")]
    assert w.threads == {"featurebank-writer"}
    assert t.busy > 0


def test_writer_thread_error_reaches_the_caller():
    w = _FakeWriter(fail_after=2)
    t = WriterThread(depth=1)
    with pytest.raises(OSError, match="disk full"):
        for k in range(50):
            t.put(w.add, [f"id{k}"], np.zeros((1, 4), np.float32), ["c"])
        t.close()
    with pytest.raises(OSError):
        t.close()


# --- out-of-memory back-off


class _SmallDevice(torch.nn.Module):
    """A model on a pretend device that runs out of memory above ``limit`` images per call."""

    def __init__(self, limit):
        super().__init__()
        self.limit, self.calls = limit, []

    def forward(self, x):
        self.calls.append(len(x))
        if len(x) > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return x.flatten(1)[:, :3] * 2


def test_forward_splits_batches_after_out_of_memory_and_remembers():
    model = _SmallDevice(limit=5)
    f = Forward(model, CPU, None, max_batch=32)
    x = torch.arange(24 * 3 * 2 * 2, dtype=torch.float32).view(24, 3, 2, 2)
    out = f(x)
    assert torch.equal(out, x.flatten(1)[:, :3] * 2)
    assert f.max_batch == 4  # 32 -> 16 -> 8 -> 4
    model.calls.clear()
    f(x)
    assert max(model.calls) == 4  # no new out-of-memory: the smaller size is kept


def test_probe_finds_the_largest_power_of_two_that_fits():
    f = Forward(_SmallDevice(limit=100), CPU, None, max_batch=1)
    assert f.probe((3, 2, 2), 512) == 64


def test_other_errors_are_not_swallowed():
    class Broken(torch.nn.Module):
        def forward(self, x):
            raise ValueError("shape mismatch")

    with pytest.raises(ValueError):
        Forward(Broken(), CPU, None, 8)(torch.zeros(4, 3, 2, 2))
    assert is_oom(RuntimeError("CUDA error: out of memory")) and not is_oom(RuntimeError("other"))


def test_padding_for_a_compiled_model_keeps_one_shape():
    seen = []

    class Model(torch.nn.Module):
        def forward(self, x):
            seen.append(len(x))
            return x.flatten(1)

    out = Forward(Model(), CPU, None, 8, pad=True)(torch.ones(5, 1, 1, 1))
    assert out.shape == (5, 1) and seen == [8]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_probe_on_the_gpu_finds_a_batch():
    model = torch.nn.Conv2d(3, 8, 3).cuda()
    f = Forward(model, CUDA, torch.float16, 1)
    assert f.probe((3, 64, 64), 64) == 64


# --- JPEG headers and the DCT-scaled path


def _jpeg(w, h, mode="RGB") -> bytes:
    buf = io.BytesIO()
    Image.new(mode, (w, h), 128).save(buf, "JPEG", progressive=(w % 2 == 1))
    return buf.getvalue()


@pytest.mark.parametrize("w,h,mode,comps", [(500, 375, "RGB", 3), (333, 251, "L", 1), (64, 48, "CMYK", 4)])
def test_jpeg_header(w, h, mode, comps):
    assert jpeg_header(_jpeg(w, h, mode)) == (w, h, comps)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_jpeg_orientation(orientation):
    buf = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = orientation
    exif[0x010F] = "camera maker"
    Image.new("RGB", (40, 30)).save(buf, "JPEG", exif=exif)
    assert jpeg_orientation(buf.getvalue()) == orientation
    assert jpeg_orientation(_jpeg(40, 30)) == 1


def test_jpeg_header_of_garbage_is_none():
    assert jpeg_header(b"\xff\xd8\xff\xe0\x00") is None
    assert jpeg_header(b"\xff\xd8\xff" + bytes(100)) is None


def test_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    from skimage import data

    pre = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    p = tmp_path / "big.jpg"
    Image.fromarray(data.astronaut()).resize((2048, 2048)).save(p, quality=90)
    fast = Decoder(pre)(p)
    plain = Decoder(pre, "plain")(p)
    cos = torch.nn.functional.cosine_similarity(fast.flatten(), plain.flatten(), dim=0)
    assert fast.shape == (3, 224, 224) and cos > 0.999


# --- the progress bar names the bottleneck


class _Bar:
    def __init__(self):
        self.n, self.postfix = 0, ""

    def update(self, n):
        self.n += n

    def set_postfix_str(self, s, refresh=True):
        self.postfix = s


def test_progress_shows_the_bottleneck():
    bar = _Bar()
    rec = Recorder(None, [], [], [], bar, threaded=False)
    rec.time("decode", 0.3)
    rec.time("forward", 2.0)
    rec.advance(32)
    assert bar.n == 32 and bar.postfix.startswith("bottleneck: forward")
    rec._shown = 0
    rec.time("wait for decode", 9.0)
    rec.advance(32)
    assert bar.postfix.startswith("bottleneck: wait for decode")


def test_device_resizing_path_matches_the_uint8_path():
    """The GPU finishes float pixels (device kernels); run that branch on the CPU against uint8."""
    from skimage import data

    pre = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    u8 = torch.from_numpy(data.coffee().copy()).permute(2, 0, 1)
    dec = Decoder(pre)
    a, b = dec.finish(u8), dec.finish(u8.float())
    assert a.shape == b.shape == (3, 224, 224)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9999


def _extract_in_daemon(folder, store, out):
    from featurebank.features.engine import extract

    torch.set_num_threads(1)  # a forked child must not run OpenMP on several threads
    try:
        r = extract(folder, "efficientnet_lite0", store, batch_size=2, progress=False, say=lambda s: None)
        out.put((r.layout, r.embedded))
    except BaseException as exc:
        out.put((repr(exc), -1))


def test_inside_a_daemonic_worker_everything_runs_in_process(tmp_path):
    """Dask and pool workers are daemonic and may not start processes: the engine stays in-process."""
    import multiprocessing as mp

    (tmp_path / "c").mkdir()
    for k in range(6):
        Image.new("RGB", (40, 30), (40 * k, 90, 200)).save(tmp_path / "c" / f"{k}.jpg")
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    p = ctx.Process(target=_extract_in_daemon, args=(tmp_path, tmp_path / "store", out), daemon=True)
    p.start()
    layout, n = out.get(timeout=240)
    p.join()
    assert n == 6 and layout.startswith("cpu: 1 process"), layout


def test_truncated_jpeg_fails_like_the_plain_path(tmp_path):
    """libjpeg would decode a cut-off file into a half-grey picture; the engine must refuse it."""
    from featurebank.features.images import ImageError

    pre = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    p = tmp_path / "cut.jpg"
    p.write_bytes(_jpeg(320, 240)[:-200])
    with pytest.raises(ImageError):
        Decoder(pre)(p)


def test_a_fifo_is_refused_without_opening_it(tmp_path):
    import os

    from featurebank.features.images import ImageError

    pre = Preprocessing(224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="regular file"):
        Decoder(pre)(fifo)  # would block forever if it were opened
