"""Fuzzing the image path: ``model.image_io.load_image``, ``ImageFetcher`` and ``/predict`` with local paths
and with a local HTTP image server on 127.0.0.1.

The corpus holds what real task data contains by accident or on purpose: zero-byte, truncated and non-image
files, 16-bit, float, grayscale, bilevel, palette, RGBA, CMYK and LAB images, animated GIFs and multi-page
TIFFs, a PNG header claiming 20000 x 20000 pixels (never allocated), a real 9000 x 8000 decompression bomb
(75 kB of zeros that would decode to 216 MB), EPS (which Pillow would hand to Ghostscript), and every EXIF
orientation value, out-of-range ones and broken EXIF blocks included. Hypothesis adds mutated encodings
(bit flips, cuts, splices) of valid images.

Expected: ``load_image`` returns a C-contiguous (H, W, 3) uint8 array in display orientation or raises
``ImageError``; the fetcher returns one or raises ``ImageFetchError`` with its reason; ``/predict`` answers
200 with one prediction per task (empty for an unusable image, its reason counted in /metrics) -- never a 500,
never another exception, never a hang. Case counts are printed and written to
``runs/hardening/fuzz_images.json``; ``HIH_FUZZ_SCALE`` multiplies the Hypothesis examples.
"""

from __future__ import annotations

import io
import json
import os
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import SimpleNamespace

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from active_learning.images import ImageFetcher, ImageFetchError
from backend import model_api
from backend.app import create_app
from backend.metrics import METRICS
from hih_settings import PROJECT_ROOT, Settings
from model.image_io import ImageError, load_image

CONFIG = (PROJECT_ROOT / "label_config.xml").read_text()
SCALE = float(os.environ.get("HIH_FUZZ_SCALE", "1"))
SECONDS = 10.0  # per image or request
COUNTS: Counter[str] = Counter()
H, W = 40, 30  # the base image: portrait, so that a 90-degree EXIF rotation shows


def fuzz_settings(n: int):
    return settings(
        max_examples=max(1, int(n * SCALE)), deadline=None, database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )  # fmt: skip


# ------------------------------------------------------------------------------------------ the corpus
def base(mode: str = "RGB") -> Image.Image:
    yy, xx = np.mgrid[0:H, 0:W]
    rgb = np.stack([xx * 8 % 256, yy * 6 % 256, (xx * yy) % 256], axis=2).astype(np.uint8)
    return Image.fromarray(rgb).convert(mode)


def enc(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(w: int, h: int) -> bytes:
    """A PNG that claims w x h RGB pixels and holds none (a decompression-bomb header)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IEND", b"")


def png_zero_bomb(w: int, h: int) -> bytes:
    """A valid grayscale PNG of w x h zeros: tiny on disk, w * h * 3 bytes once decoded to RGB."""
    comp = zlib.compressobj(9)
    row = b"\x00" * (w + 1)
    body = b"".join(comp.compress(row) for _ in range(h)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", body) + _chunk(b"IEND", b"")


def with_exif(fmt: str, orientation) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return enc(base(), fmt, exif=exif)


def corpus() -> dict[str, tuple[bytes, object]]:
    """name -> (bytes, expected): expected is (h, w) for a readable image, ``"error"`` when it must be
    refused, or ``"any"`` when either is fine (as long as it is one of the two)."""
    rgb = base()
    out: dict[str, tuple[bytes, object]] = {}
    valid = {
        "png": enc(rgb, "PNG"), "jpeg": enc(rgb, "JPEG", quality=90), "gif": enc(rgb, "GIF"),
        "webp": enc(rgb, "WEBP"), "tiff": enc(rgb, "TIFF"), "bmp": enc(rgb, "BMP"),
    }  # fmt: skip
    for name, data in valid.items():
        out[name] = (data, (H, W))
        out[f"{name}-truncated-half"] = (data[: len(data) // 2], "any")
        out[f"{name}-truncated-header"] = (data[:24], "error")
        out[f"{name}-truncated-end"] = (data[:-12], "any")
    out["zero-byte"] = (b"", "error")
    out["one-byte"] = (b"\x89", "error")
    out["text"] = (b"this is not an image\n" * 10, "error")
    out["html"] = (b"<!doctype html><html><body>404 Not Found</body></html>", "error")
    out["svg"] = (b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect/></svg>', "error")
    out["pdf"] = (b"%PDF-1.4\n1 0 obj <<>> endobj\ntrailer <<>>\n%%EOF", "error")
    out["json"] = (json.dumps({"error": "forbidden"}).encode(), "error")
    out["elf"] = (Path(sys.executable).resolve().read_bytes()[:4096], "error")
    out["png-magic-then-junk"] = (b"\x89PNG\r\n\x1a\n" + os.urandom(200), "error")
    out["jpeg-magic-then-junk"] = (b"\xff\xd8\xff\xe0" + os.urandom(200), "error")
    # bit depths and colour modes
    gray16 = (np.arange(H * W, dtype=np.uint16).reshape(H, W) * 50).astype(np.uint16)
    out["png-16bit-gray"] = (enc(Image.fromarray(gray16), "PNG"), (H, W))
    out["tiff-16bit-gray"] = (enc(Image.fromarray(gray16), "TIFF"), (H, W))
    out["png-16bit-rgb"] = (cv2.imencode(".png", np.dstack([gray16] * 3))[1].tobytes(), (H, W))
    out["tiff-float32"] = (enc(Image.fromarray(gray16.astype(np.float32) / 65535.0), "TIFF"), (H, W))
    for mode in ("L", "LA", "1", "P", "RGBA"):
        out[f"png-{mode}"] = (enc(base(mode), "PNG"), (H, W))
    out["tiff-I32"] = (enc(Image.fromarray(gray16.astype(np.int32) * 1000), "TIFF"), (H, W))
    p_trans = base("P")
    p_trans.info["transparency"] = 0
    out["png-P-transparency"] = (enc(p_trans, "PNG", transparency=0), (H, W))
    out["jpeg-gray"] = (enc(base("L"), "JPEG"), (H, W))
    out["jpeg-cmyk"] = (enc(base("CMYK"), "JPEG"), (H, W))
    out["tiff-cmyk"] = (enc(base("CMYK"), "TIFF"), (H, W))
    out["tiff-lab"] = (enc(base("LAB"), "TIFF"), (H, W))
    out["webp-rgba"] = (enc(base("RGBA"), "WEBP", lossless=True), (H, W))
    out["bmp-1bit"] = (enc(base("1"), "BMP"), (H, W))
    frames = [base(), base().transpose(Image.Transpose.FLIP_LEFT_RIGHT)]
    out["gif-animated"] = (enc(frames[0], "GIF", save_all=True, append_images=frames[1:]), (H, W))
    out["tiff-multipage"] = (enc(frames[0], "TIFF", save_all=True, append_images=frames[1:]), (H, W))
    out["png-1x1"] = (enc(Image.new("RGB", (1, 1)), "PNG"), (1, 1))
    out["png-1x3000"] = (enc(Image.new("RGB", (3000, 1)), "PNG"), (1, 3000))
    out["png-3000x1"] = (enc(Image.new("RGB", (1, 3000)), "PNG"), (3000, 1))
    out["eps"] = (enc(base(), "EPS"), "any")  # Ghostscript-dependent in load_image; refused by the fetcher
    # decompression bombs
    out["bomb-20000x20000-header"] = (png_header_only(20000, 20000), "error")
    out["bomb-100000x100000-header"] = (png_header_only(100_000, 100_000), "error")
    # EXIF orientation: 5..8 swap width and height; anything else (0, 9, 255, ...) leaves the image as stored
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF"):
        for o in (1, 2, 3, 4, 5, 6, 7, 8, 0, 9, 255, 65535):
            out[f"exif-{fmt.lower()}-{o}"] = (with_exif(fmt, o), (W, H) if 5 <= o <= 8 else (H, W))
        out[f"exif-{fmt.lower()}-tuple"] = (with_exif(fmt, (6, 6)), "any")
    out["exif-jpeg-broken-block"] = (
        enc(rgb, "JPEG", exif=b"Exif\x00\x00MM\x00*\x00\x00\x00\x08\x00\x05\x01\x12"), (H, W)
    )
    out["exif-jpeg-garbage-block"] = (enc(rgb, "JPEG", exif=b"Exif\x00\x00" + os.urandom(64)), "any")
    return out


CORPUS = corpus()


def check_array(arr: np.ndarray, expected: object, name: str) -> None:
    assert isinstance(arr, np.ndarray) and arr.dtype == np.uint8, name
    assert arr.ndim == 3 and arr.shape[2] == 3 and arr.flags["C_CONTIGUOUS"], (name, arr.shape)
    assert expected != "error", f"{name}: read as {arr.shape}, expected a refusal"
    if isinstance(expected, tuple):
        assert arr.shape[:2] == expected, (name, arr.shape, expected)


def timed(target: str, fn, *args, limit: float = SECONDS, **kwargs):
    COUNTS[target] += 1
    t0 = time.monotonic()
    try:
        return fn(*args, **kwargs)
    finally:
        assert time.monotonic() - t0 < limit, f"{target} took {time.monotonic() - t0:.1f} s"


def load_or_error(data: bytes) -> np.ndarray | ImageError:
    try:
        return timed("load_image", load_image, data)
    except ImageError as exc:
        assert str(exc).strip()
        return exc


# ------------------------------------------------------------------------------------------ fixtures
class ImageServer:
    """Serves the corpus on 127.0.0.1 (``/img/<name>``), plus a response that lies about its length."""

    def __init__(self, files: dict[str, bytes]) -> None:
        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802
                if self.path == "/lying-length":
                    self.send_response(200)
                    self.send_header("Content-Length", "100000")
                    self.end_headers()
                    self.wfile.write(files["png"][:100])
                    return
                body = files.get(self.path.removeprefix("/img/"))
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args: object) -> None:
                pass

        self.files = files
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.host = f"127.0.0.1:{self.server.server_address[1]}"
        self.url = f"http://{self.host}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="module")
def env(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest):
    import torch

    torch.set_num_threads(1)
    folder = tmp_path_factory.mktemp("fuzz-images")
    files = {name: data for name, (data, _) in CORPUS.items()}
    files["bomb-9000x8000-zeros"] = png_zero_bomb(9000, 8000)
    paths = {}
    for name, data in files.items():
        paths[name] = folder / f"{name}.img"
        paths[name].write_bytes(data)
    server = ImageServer(files)
    s = Settings(weights=tiny_checkpoint, device="cpu", threads=1, label_studio_url="http://127.0.0.1:9",
                 allowed_hosts=server.host)  # fmt: skip
    model_api.clear_caches()
    METRICS.reset()
    client = create_app(s, warm_up=False).test_client()
    yield SimpleNamespace(client=client, paths=paths, server=server, folder=folder, files=files,
                          fetcher=ImageFetcher(s.label_studio_url, "", s.allowed_hosts, s.max_image_bytes))
    server.close()
    report = {k: COUNTS[k] for k in sorted(COUNTS)} | {"total": sum(COUNTS.values())}
    out = PROJECT_ROOT / "runs" / "hardening" / "fuzz_images.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    line = "fuzz_images cases tried: " + ", ".join(f"{k}={v}" for k, v in report.items())
    plugins = request.config.pluginmanager
    reporter, capman = plugins.getplugin("terminalreporter"), plugins.getplugin("capturemanager")
    if reporter is None or capman is None:
        print(line)
    else:
        with capman.global_and_fixture_disabled():
            reporter.write_line("\n" + line)


def predict(env, values: list[str], boxes: bool = False) -> list[dict]:
    box = {"type": "rectanglelabels", "to_name": "image", "from_name": "face",
           "value": {"x": 10, "y": 10, "width": 80, "height": 80, "rectanglelabels": ["Face"]}}  # fmt: skip
    tasks = [{"id": i, "data": {"image": v}, **({"annotations": [{"result": [box]}]} if boxes else {})}
             for i, v in enumerate(values)]  # fmt: skip
    before = (METRICS.tasks, METRICS.predictions, sum(METRICS.failures.values()))
    r = timed("predict_request", env.client.post, "/predict", json={"tasks": tasks, "label_config": CONFIG},
              limit=SECONDS + 0.3 * len(tasks))
    COUNTS["predict_task"] += len(values) - 1  # timed() counted one
    assert r.status_code == 200, r.get_data(as_text=True)[:500]
    results = r.json["results"]
    assert len(results) == len(values)
    after = (METRICS.tasks, METRICS.predictions, sum(METRICS.failures.values()))
    n, ok, failed = (a - b for a, b in zip(after, before, strict=True))
    assert n == len(values) and ok + failed == n  # an empty prediction always has a counted reason
    return results


# ------------------------------------------------------------------------------------------ load_image
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_load_image_reads_or_refuses_every_corpus_file(name: str) -> None:
    data, expected = CORPUS[name]
    out = load_or_error(data)
    if isinstance(out, ImageError):
        assert expected in ("error", "any"), f"{name}: refused ({out}) but should read as {expected}"
    else:
        check_array(out, expected, name)


def test_decompression_bomb_headers_are_refused_without_allocating() -> None:
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for w, h in ((20000, 20000), (100_000, 100_000), (1, 2**31 - 1)):
        t0 = time.monotonic()
        with pytest.raises(ImageError):
            timed("load_image", load_image, png_header_only(w, h))
        assert time.monotonic() - t0 < 1.0
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 100, f"peak memory grew {grown_mb:.0f} MB"


def test_exif_orientation_is_applied_to_the_pixels() -> None:
    """Orientation 6 (rotate 90 clockwise to display): the stored top-left pixel ends up top-right."""
    stored = np.asarray(base())
    shown = load_image(with_exif("PNG", 6))
    assert shown.shape == (W, H, 3)
    np.testing.assert_array_equal(shown, np.rot90(stored, k=-1))
    np.testing.assert_array_equal(load_image(with_exif("PNG", 3)), stored[::-1, ::-1])


def test_16_bit_images_are_scaled_not_clipped() -> None:
    gray16 = np.full((8, 8), 65535, dtype=np.uint16)
    gray16[:4] = 32768
    out = load_image(enc(Image.fromarray(gray16), "PNG"))
    assert out[0, 0, 0] in (127, 128) and out[-1, 0, 0] == 255


@fuzz_settings(300)
@given(data=st.data())
def test_mutated_encodings_read_or_raise_image_error(data) -> None:
    names = ["png", "jpeg", "gif", "webp", "tiff", "bmp", "png-16bit-gray", "tiff-cmyk", "exif-jpeg-6",
             "gif-animated"]
    name = data.draw(st.sampled_from(names))
    raw = bytearray(CORPUS[name][0])
    for _ in range(data.draw(st.integers(1, 4))):
        kind = data.draw(st.sampled_from(["flip", "cut", "insert", "delete", "dup"]))
        i = data.draw(st.integers(0, max(0, len(raw) - 1)))
        if kind == "flip" and raw:
            raw[i] ^= data.draw(st.integers(1, 255))
        elif kind == "cut":
            del raw[i:]
        elif kind == "insert":
            raw[i:i] = data.draw(st.binary(min_size=1, max_size=16))
        elif kind == "delete":
            del raw[i : i + data.draw(st.integers(1, 16))]
        else:
            raw[i:i] = raw[i : i + data.draw(st.integers(1, 64))]
    out = load_or_error(bytes(raw))
    if isinstance(out, np.ndarray):
        check_array(out, "any", name)


@fuzz_settings(150)
@given(magic=st.sampled_from([b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF89a", b"RIFF\x00\x00\x00\x00WEBP",
                              b"II*\x00", b"MM\x00*", b"BM", b"P6\n", b"\x00\x00\x01\x00"]),
       tail=st.binary(max_size=300))  # fmt: skip
def test_random_bytes_behind_a_magic_number_read_or_raise_image_error(magic: bytes, tail: bytes) -> None:
    out = load_or_error(magic + tail)
    if isinstance(out, np.ndarray):
        check_array(out, "any", "magic")


# ------------------------------------------------------------------------------------------ the fetcher
def test_fetcher_reads_or_refuses_every_file_with_a_reason(env) -> None:
    reasons: Counter[str] = Counter()
    for name, path in env.paths.items():
        expected = CORPUS[name][1] if name in CORPUS else "error"
        for value in (str(path), f"file://{path}", f"{env.server.url}/img/{name}"):
            try:
                arr = timed("fetch", env.fetcher.fetch, value)
            except ImageFetchError as exc:
                assert exc.reason in ("unreadable", "too_large"), (name, exc.reason, str(exc))
                assert expected in ("error", "any"), f"{name} via {value}: refused ({exc}), not {expected}"
                reasons[exc.reason] += 1
                continue
            check_array(arr, expected, name)
    assert reasons["too_large"] >= 3 * 3  # the three bombs, three ways each


def test_the_real_decompression_bomb_is_refused_from_its_header(env) -> None:
    data = env.files["bomb-9000x8000-zeros"]
    assert len(data) < 200_000  # 72 M pixels in ~75 kB
    t0 = time.monotonic()
    with pytest.raises(ImageFetchError) as err:
        timed("fetch", env.fetcher.fetch, str(env.paths["bomb-9000x8000-zeros"]))
    assert err.value.reason == "too_large" and "pixels" in str(err.value) and time.monotonic() - t0 < 2


def test_eps_is_never_handed_to_ghostscript(env) -> None:
    with pytest.raises(ImageFetchError, match="EPS, not an accepted format") as err:
        timed("fetch", env.fetcher.fetch, str(env.paths["eps"]))
    assert err.value.reason == "unreadable"


def test_special_files_are_refused_at_once(env, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo.png"
    os.mkfifo(fifo)  # opening it for reading would block until a writer comes
    cases = {str(fifo): "not_found", str(tmp_path): "not_found", "a/" * 5000: "not_found"}
    for special in ("/proc/kmsg", "/proc/self/pagemap", "/proc/self/mem", "/dev/zero", "/dev/urandom",
                    "/sys/kernel/notes", "file:///proc/self/environ"):  # fmt: skip
        cases[special] = "forbidden_host"
    link = tmp_path / "innocent.png"
    link.symlink_to("/proc/self/environ")
    cases[str(link)] = "forbidden_host"
    for value, reason in cases.items():
        with pytest.raises(ImageFetchError) as err:
            timed("fetch", env.fetcher.fetch, value)
        assert err.value.reason == reason, (value[:50], err.value.reason, str(err.value)[:200])
        assert len(str(err.value)) < 1000


def test_a_response_shorter_than_its_content_length_is_a_network_error(env) -> None:
    with pytest.raises(ImageFetchError) as err:
        timed("fetch", env.fetcher.fetch, f"{env.server.url}/lying-length")
    assert err.value.reason == "network"


# ------------------------------------------------------------------------------------------ /predict
def sample(names) -> list[str]:
    """Every file but most EXIF variants (each readable image costs a face detection; the orientations have
    their own test below, with face boxes)."""
    return [n for n in sorted(names) if not n.startswith("exif-") or n in ("exif-jpeg-6", "exif-png-255")]


def test_predict_with_local_paths_serves_or_empties_every_file(env) -> None:
    names = sample(env.paths)
    results = predict(env, [str(env.paths[n]) for n in names])
    readable = [n for n in names if isinstance(CORPUS.get(n, (None, "error"))[1], tuple)]
    assert len(readable) > 25
    for n, p in zip(names, results, strict=True):
        assert p["model_version"] == "test-tiny" and isinstance(p["result"], list), n


def test_predict_through_a_local_http_image_server(env) -> None:
    names = sample(env.files)
    results = predict(env, [f"{env.server.url}/img/{n}" for n in names] + [f"{env.server.url}/img/missing"])
    assert results[-1]["result"] == []
    text = env.client.get("/metrics").get_data(as_text=True)
    for reason in ("not_found", "unreadable", "too_large"):
        assert f'hih_prediction_failures_total{{reason="{reason}"}}' in text


def test_predict_gives_display_coordinates_for_every_exif_orientation(env) -> None:
    """With a face box given, every readable orientation yields a face whose original_width/height are the
    displayed (rotated) size."""
    names = [n for n in sorted(CORPUS) if n.startswith("exif-") and isinstance(CORPUS[n][1], tuple)]
    results = predict(env, [str(env.paths[n]) for n in names], boxes=True)
    for n, p in zip(names, results, strict=True):
        h, w = CORPUS[n][1]
        assert p["result"], n
        assert {(r["original_width"], r["original_height"]) for r in p["result"]} == {(w, h)}, n


def test_mutated_images_over_http_and_from_disk_get_one_prediction_each(env) -> None:
    run_mutants(env)


@fuzz_settings(60)
@given(data=st.data())
def run_mutants(env, data) -> None:
    raw = bytearray(CORPUS[data.draw(st.sampled_from(["png", "jpeg", "webp", "tiff", "gif"]))][0])
    for _ in range(data.draw(st.integers(1, 3))):
        i = data.draw(st.integers(0, len(raw) - 1))
        if data.draw(st.booleans()):
            raw[i] ^= data.draw(st.integers(1, 255))
        else:
            del raw[i:]
        if not raw:
            break
    name = f"mutant-{data.draw(st.integers(0, 9))}"
    env.files[name] = bytes(raw)
    path = env.folder / f"{name}.img"
    path.write_bytes(bytes(raw))
    results = predict(env, [str(path), f"{env.server.url}/img/{name}"], boxes=data.draw(st.booleans()))
    assert all(isinstance(p["result"], list) for p in results)
