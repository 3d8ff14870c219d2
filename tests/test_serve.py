"""`vitkit serve`: the API against a real uvicorn on 127.0.0.1 (the CLI in a subprocess, and the app in
a thread where a test needs to reach the predictor), dynamic batching, the bounded queue, bad input."""

from __future__ import annotations

import base64
import dataclasses
import http.client
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from PIL import Image

import vitkit
from test_data import fake_images, offline_idx
from vitkit.cli import main
from vitkit.data import fashion_mnist
from vitkit.serve import Predictor, load_served_model
from vitkit.serve.predictor import bucket_sizes

pytest.importorskip("fastapi", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")
pytest.importorskip("multipart", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")
uvicorn = pytest.importorskip("uvicorn", reason="vitkit serve needs the serve extra: pip install 'vitkit[serve]'")
# the app module imports FastAPI: reached only once the extra is known to be installed
create_app = pytest.importorskip("vitkit.serve.app").create_app


# -- a real run, real servers, a plain HTTP client -----------------------------------------------------
@contextmanager
def tiny_run(tmp: Path) -> Iterator[Path]:
    """A 1-epoch run of a one-block ViT on tiny IDX files (with a test split, so a logged test top-1);
    VITKIT_DATA points at those files until the context ends."""
    with pytest.MonkeyPatch.context() as mp:
        offline_idx(mp, tmp, n_train=200, n_test=40)
        out = tmp / "run"
        assert (
            main(
                [
                    "train",
                    "--output",
                    str(out),
                    "--seed",
                    "0",
                    "--epochs",
                    "1",
                    "--patch-size",
                    "7",
                    "--batch-size",
                    "32",
                    "--threads",
                    "1",
                    "--val-samples",
                    "20",
                    "--set",
                    "model_args.depth=1",
                    "--set",
                    "model_args.embed_dim=32",
                    "--set",
                    "model_args.num_heads=2",
                ]
            )
            == 0
        )
        yield out


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Iterator[Path]:
    with tiny_run(tmp_path_factory.mktemp("serve")) as out:
        yield out


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("images")
    paths = []
    for i, pixels in enumerate(fake_images(6, seed=3)[0]):
        paths.append(folder / f"img{i}.png")
        Image.fromarray(pixels.numpy(), mode="L").save(paths[-1])
    return paths


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LiveServer:
    """The app under a real uvicorn in a thread, on a socket bound to 127.0.0.1 and a free port."""

    def __init__(self, app) -> None:
        self.socket = socket.socket()
        self.socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.socket.getsockname()[1]}"
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def __enter__(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "uvicorn did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self.socket.close()


def serve(run_dir: Path, max_bytes: int = 10 * 2**20, **settings) -> tuple[LiveServer, Predictor]:
    predictor = Predictor(load_served_model(run=run_dir), **settings)
    return LiveServer(create_app(predictor, max_bytes=max_bytes)), predictor


def request(
    url: str, body: bytes | None = None, headers: dict[str, str] | None = None, method: str | None = None
) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=body, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as err:
        return err.code, {k.lower(): v for k, v in err.headers.items()}, err.read()


def multipart(files: list[tuple[str, str, bytes]]) -> tuple[bytes, dict[str, str]]:
    """(body, headers) of a multipart/form-data upload of (field, filename, bytes) parts."""
    boundary = "vitkit-test-boundary"
    parts = []
    for field, name, data in files:
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{name}"\r\n'
        parts.append(head.encode() + b"Content-Type: application/octet-stream\r\n\r\n" + data + b"\r\n")
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def predict_json(paths: list[Path], run_dir: Path, capsys) -> list[dict]:
    capsys.readouterr()
    assert main(["predict", *map(str, paths), "--run", str(run_dir), "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def assert_same_answers(served: list[dict], printed: list[dict], tol: float = 1e-6) -> None:
    assert len(served) == len(printed)
    for s, p in zip(served, printed):
        assert [(t["class"], t["index"]) for t in s["top"]] == [(t["class"], t["index"]) for t in p["top"]]
        assert [t["prob"] for t in s["top"]] == pytest.approx([t["prob"] for t in p["top"]], abs=tol)


# -- the command, end to end ---------------------------------------------------------------------------
def test_vitkit_serve_answers_like_vitkit_predict(run, images, capsys):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(vitkit.__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "vitkit", "serve", "--run", str(run), "--port", str(port), "--log-level", "warning"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                status, _, body = request(f"{url}/healthz")
                break
            except OSError:
                assert time.monotonic() < deadline, "vitkit serve did not start"
                time.sleep(0.2)
        assert status == 200 and json.loads(body)["status"] == "ok"
        info = json.loads(request(f"{url}/v1/model")[2])
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert info["test_top1"] == records[-1]["test_top1"] and info["classes"] == fashion_mnist.CLASSES
        assert info["name"] == "vit_tiny_patch16_224" and info["input"]["img_size"] == 28
        assert info["input"]["in_chans"] == 1 and info["attention"] == "last"
        assert info["versions"]["vitkit"] == vitkit.__version__ and "torch" in info["versions"]
        body, headers = multipart([("image", p.name, p.read_bytes()) for p in images[:3]])
        status, _, answer = request(f"{url}/v1/predict", body, headers)
        assert status == 200
        served = json.loads(answer)
        assert [e["image"] for e in served] == [p.name for p in images[:3]]
        assert_same_answers(served, predict_json(images[:3], run, capsys))
    finally:
        proc.send_signal(signal.SIGINT)  # uvicorn's graceful shutdown
        assert proc.wait(timeout=30) == 0


def test_vitkit_serve_errors_are_one_line(run, tmp_path, capsys):
    # failures while running exit 1 (usage errors 2)
    assert main(["serve", "--run", str(tmp_path / "missing"), "--port", "0"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "run folder" in err and "does not exist" in err
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        assert main(["serve", "--run", str(run), "--port", str(taken.getsockname()[1])]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cannot listen on 127.0.0.1" in err and "--port" in err


# -- the API -------------------------------------------------------------------------------------------
def _same_top(a: list[dict], b: list[dict]) -> bool:
    """The same classes in the same order, probabilities equal up to float32 rounding: requests that share
    a batch run a matmul of another shape, whose sums may round differently (~1e-8)."""
    same_classes = [(t["class"], t["index"]) for t in a] == [(t["class"], t["index"]) for t in b]
    return same_classes and all(abs(x["prob"] - y["prob"]) <= 1e-6 for x, y in zip(a, b))


def test_multipart_json_and_raw_bodies_answer_alike(run, images, capsys):
    server, _ = serve(run)
    data = [p.read_bytes() for p in images[:2]]
    with server:
        body, headers = multipart([("image", "a.png", data[0]), ("image", "b.png", data[1])])
        by_form = json.loads(request(f"{server.url}/v1/predict?top_k=3", body, headers)[2])
        b64 = {
            "images": [
                base64.b64encode(data[0]).decode(),
                "data:image/png;base64," + base64.b64encode(data[1]).decode(),
            ],
            "top_k": 3,
        }
        by_json = json.loads(
            request(f"{server.url}/v1/predict", json.dumps(b64).encode(), {"Content-Type": "application/json"})[2]
        )
        raw = json.loads(request(f"{server.url}/v1/predict?top_k=3", data[1], {"Content-Type": "image/png"})[2])
    assert [e["image"] for e in by_json] == ["images[0]", "images[1]"] and len(by_form[0]["top"]) == 3
    for a, b in zip(by_form, by_json):
        assert _same_top(a["top"], b["top"])
    assert _same_top(raw[0]["top"], by_form[1]["top"])
    assert_same_answers(by_form, [{"top": e["top"][:3]} for e in predict_json(images[:2], run, capsys)])


def test_attention_map_comes_with_the_answer_when_asked(run, images):
    server, _ = serve(run)
    with server:
        body, headers = multipart([("image", "a.png", images[0].read_bytes())])
        plain = json.loads(request(f"{server.url}/v1/predict", body, headers)[2])[0]
        mapped = json.loads(request(f"{server.url}/v1/predict?attention=true", body, headers)[2])[0]
    assert "attention" not in plain and mapped["top"] == plain["top"]
    att = mapped["attention"]
    assert att["method"] == "last" and att["grid"] == [4, 4] and att["crop"] == [0, 0, 28, 28]  # 28 / patch 7
    assert len(att["heat"]) == 16 and max(att["heat"]) == 1.0 and min(att["heat"]) >= 0


def test_a_model_without_attention_answers_with_the_bars_alone(tmp_path, images):
    from vitkit.data.transforms import ImageSpec
    from vitkit.train.modeling import build_torchvision, save_weights

    model = build_torchvision("mobilenet_v3_small", num_classes=10, in_chans=1, img_size=32)
    save_weights(
        model, tmp_path / "tv.safetensors", spec=ImageSpec(32, 1, (0.5,), (0.5,)), classes=fashion_mnist.CLASSES
    )
    served = load_served_model(checkpoint=tmp_path / "tv.safetensors")
    assert served.attention is None and served.test_top1 is None
    with LiveServer(create_app(Predictor(served))) as server:
        body, headers = multipart([("image", "a.png", images[0].read_bytes())])
        status, _, answer = request(f"{server.url}/v1/predict?attention=true", body, headers)
        info = json.loads(request(f"{server.url}/v1/model")[2])
    assert status == 200 and "attention" not in json.loads(answer)[0] and len(json.loads(answer)[0]["top"]) == 5
    assert info["name"] == "torchvision:mobilenet_v3_small" and info["attention"] is None


def test_a_swin_answers_with_its_class_activation_map(tmp_path, images):
    from vitkit.data.transforms import ImageSpec
    from vitkit.factory import create_model
    from vitkit.tools.attention_maps import attention_map
    from vitkit.train.modeling import save_weights

    # two tiny stages: 32 px / patch 4 = an 8x8 grid, merged to 4x4; windows of 4
    model = create_model(
        "swin_tiny_patch4_window7_224",
        img_size=32,
        in_chans=1,
        num_classes=10,
        embed_dim=16,
        depths=(1, 1),
        num_heads=(1, 2),
        window_size=4,
        pretrained_window_sizes=(0, 0),
    )
    save_weights(
        model, tmp_path / "swin.safetensors", spec=ImageSpec(32, 1, (0.5,), (0.5,)), classes=fashion_mnist.CLASSES
    )
    predictor = Predictor(load_served_model(checkpoint=tmp_path / "swin.safetensors"))
    image = predictor.decode(images[0].read_bytes(), "a.png")  # 28x28 resized to 32: the whole picture
    predictor.start()
    try:
        (entry,) = predictor.submit([image], attention=True).result(timeout=60)
    finally:
        predictor.close()
    att = entry["attention"]
    assert att["method"] == "cam" and att["grid"] == [4, 4] and att["crop"] == [0, 0, 28, 28]
    (expected,) = attention_map(predictor.model, image.pixels[None], "cam")  # what `vitkit attention` draws
    heat = expected.heat / expected.heat.max()
    assert att["heat"] == pytest.approx(heat.flatten().tolist(), abs=1e-4)
    assert entry["top"][0]["index"] == expected.class_index


def _bomb() -> bytes:
    """A 6000 x 6000 black PNG: about 36 KB on the wire, 36 MB once decoded (over the 25 M-pixel limit)."""
    out = io.BytesIO()
    Image.new("L", (6000, 6000)).save(out, format="PNG")
    return out.getvalue()


def test_bad_input_gets_a_one_line_4xx_and_the_server_keeps_serving(run, images):
    server, _ = serve(run, max_bytes=100_000)
    png = images[0].read_bytes()

    def form(field: str, data: bytes) -> tuple[bytes, dict[str, str]]:
        return multipart([(field, "x.png", data)])

    cases = {
        "not an image": (form("image", b"hello, I am text"), 415),
        "EPS (Ghostscript)": (form("image", b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\nshowpage\n"), 415),
        "empty body": ((b"", {"Content-Type": "image/png"}), 400),
        "empty image": (form("image", b""), 400),
        "truncated": (form("image", png[: len(png) // 2]), 422),
        "decompression bomb": (form("image", _bomb()), 413),
        "over max-bytes": (form("image", png + b"\0" * 120_000), 413),
        "wrong field": (form("file", png), 422),
        "wrong JSON field": ((json.dumps({"imgs": []}).encode(), {"Content-Type": "application/json"}), 422),
        "bad base64": ((json.dumps({"images": ["%%%"]}).encode(), {"Content-Type": "application/json"}), 422),
        "not JSON": ((b"{oops", {"Content-Type": "application/json"}), 400),
        "content type": ((png, {"Content-Type": "text/plain"}), 415),
    }
    with server:
        for what, ((body, headers), expected) in cases.items():
            status, _, answer = request(f"{server.url}/v1/predict", body, headers, method="POST")
            assert status == expected, (what, answer)
            assert answer.count(b"\n") == 0 and set(json.loads(answer)) == {"error"}, (what, answer)
        status, _, answer = request(f"{server.url}/v1/predict?topk=3", *form("image", png))
        assert status == 422 and "topk" in json.loads(answer)["error"]
        status, _, answer = request(f"{server.url}/v1/predict?top_k=zero", *form("image", png))
        assert status == 422 and "top_k" in json.loads(answer)["error"]
        status, _, answer = request(f"{server.url}/v1/nothing")
        assert status == 404 and set(json.loads(answer)) == {"error"}
        # a chunked body declares no length: it is cut off at --max-bytes as it streams in
        conn = http.client.HTTPConnection(server.url.removeprefix("http://"), timeout=60)
        conn.request(
            "POST",
            "/v1/predict",
            body=iter([b"\0" * 60_000] * 3),
            encode_chunked=True,
            headers={"Content-Type": "image/png"},
        )
        chunked = conn.getresponse()
        assert chunked.status == 413 and "max-bytes" in json.loads(chunked.read())["error"]
        conn.close()
        status, _, answer = request(f"{server.url}/v1/predict", *form("image", png))  # still serving
        assert status == 200 and json.loads(answer)[0]["top"]
        assert json.loads(request(f"{server.url}/healthz")[2])["status"] == "ok"


def test_requests_that_arrive_together_share_one_forward_pass(run, images, capsys):
    server, predictor = serve(run, max_batch=4, max_wait_ms=10_000)
    bodies = [multipart([("image", p.name, p.read_bytes())]) for p in images[:4]]
    with server, ThreadPoolExecutor(4) as pool:
        start = time.monotonic()
        answers = list(pool.map(lambda b: request(f"{server.url}/v1/predict", *b), bodies))
        waited = time.monotonic() - start
    assert all(status == 200 for status, _, _ in answers)
    # the fourth request fills the batch: nobody waits the 10 s window out
    assert waited < 10 and predictor.stats["batches"] == 1 and predictor.stats["largest_batch"] == 4
    # batch members are computed together; fp32 matmuls over a batch may differ in the last bits
    assert_same_answers([json.loads(a)[0] for _, _, a in answers], predict_json(images[:4], run, capsys), tol=1e-5)


def test_a_full_queue_answers_503_with_retry_after(run, images):
    server, predictor = serve(run, max_batch=1, max_queue=2, max_wait_ms=0)
    body = multipart([("image", "a.png", images[0].read_bytes())])
    with server, ThreadPoolExecutor(3) as pool:
        with predictor.model_lock:  # the worker takes the first request, then waits for the model
            first = pool.submit(request, f"{server.url}/v1/predict", *body)
            _wait_for(lambda: predictor.stats["requests"] == 1 and predictor.pending == 0)
            queued = [pool.submit(request, f"{server.url}/v1/predict", *body) for _ in range(2)]
            _wait_for(lambda: predictor.pending == 2)
            status, headers, answer = request(f"{server.url}/v1/predict", *body)
            assert status == 503 and headers["retry-after"] == "1" and "busy" in json.loads(answer)["error"]
        assert [f.result()[0] for f in (first, *queued)] == [200, 200, 200]
    assert predictor.stats["rejected_busy"] == 1 and predictor.stats["batches"] == 3


def _wait_for(condition, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_page_is_one_self_contained_file(run):
    server, _ = serve(run)
    with server:
        status, headers, page = request(f"{server.url}/")
    html = page.decode()
    assert status == 200 and headers["content-type"].startswith("text/html")
    # no external assets: no remote URLs, no separate scripts or stylesheets
    assert "http://" not in html and "https://" not in html and "<script src" not in html and "<link" not in html
    assert "/v1/predict" in html and "/v1/model" in html


def test_a_cancelled_request_is_dropped_and_the_worker_keeps_serving(run, images):
    predictor = Predictor(load_served_model(run=run), max_batch=1, max_wait_ms=0)
    image = predictor.decode(images[0].read_bytes(), "a.png")
    predictor.start()
    try:
        with predictor.model_lock:
            running = predictor.submit([image])
            _wait_for(lambda: predictor.pending == 0)  # taken by the worker, which waits for the model
            gone = predictor.submit([image])
            assert gone.cancel()  # its client disconnected
        assert running.result(timeout=60)[0]["top"] and gone.cancelled()
        assert predictor.submit([image]).result(timeout=60)[0]["top"] == running.result()[0]["top"]
        assert predictor.stats["batches"] == 2 and predictor.alive
    finally:
        predictor.close()


def test_flip_tta_answers_equal_vitkit_predict_with_tta(run, images):
    from vitkit.tools.predict import predict

    served = dataclasses.replace(load_served_model(run=run), tta="hflip")  # as a run trained with tta: hflip
    predictor = Predictor(served, max_batch=4)
    predictor.start()
    try:
        answer = predictor.submit([predictor.decode(p.read_bytes(), p.name) for p in images[:4]]).result(timeout=60)
    finally:
        predictor.close()
    printed = predict(served.model, images[:4], served.spec, served.classes, tta="hflip", batch_size=4)
    assert_same_answers(answer, printed)
    plain = predict(served.model, images[:4], served.spec, served.classes)
    assert [e["top"][0]["prob"] for e in answer] != [e["top"][0]["prob"] for e in plain]


def test_predictor_settings_are_checked(run):
    served = load_served_model(run=run)
    with pytest.raises(ValueError, match="max-queue"):
        Predictor(served, max_batch=8, max_queue=4)
    assert torch.is_grad_enabled()  # loading did not switch autograd off for the process


def _batch_sizes_seen(model: torch.nn.Module) -> tuple[list[int], torch.utils.hooks.RemovableHandle]:
    seen: list[int] = []
    return seen, model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]))


def test_bucket_sizes_are_powers_of_two_up_to_max_batch():
    assert bucket_sizes(32) == (1, 2, 4, 8, 16, 32) and bucket_sizes(6) == (1, 2, 4, 6)
    assert bucket_sizes(1) == (1,) and bucket_sizes(3, "none") == (1, 2, 3)


def test_padded_batches_answer_like_unpadded_ones(run, images):
    # 3 and 5 images run as batches of 4 and 8; the padding rows are dropped from the answer
    answers = {}
    for buckets in ("pow2", "none"):
        predictor = Predictor(load_served_model(run=run), max_batch=8, max_wait_ms=0, buckets=buckets)
        decoded = [predictor.decode(p.read_bytes(), p.name) for p in images]
        seen, hook = _batch_sizes_seen(predictor.model)
        predictor.start()
        try:
            answers[buckets] = [predictor.submit(decoded[:n]).result(timeout=60) for n in (3, 5, 1)]
        finally:
            predictor.close()
            hook.remove()
        assert predictor.stats["images"] == 9 and predictor.stats["largest_batch"] == 5
        answers[buckets, "seen"] = seen[len(predictor.batch_sizes) :]  # after the warm-up's passes
    assert answers["pow2", "seen"] == [4, 8, 1] and answers["none", "seen"] == [3, 5, 1]
    for padded, plain in zip(answers["pow2"], answers["none"]):
        # rows are computed independently; a different batch size may change fp32 matmuls in the last bits
        assert_same_answers(padded, plain, tol=1e-6)


def test_the_server_listens_only_after_its_warm_up(run, images):
    predictor = Predictor(load_served_model(run=run), max_batch=4)
    server = LiveServer(create_app(predictor))
    port = server.socket.getsockname()[1]
    refused: list[bool] = []

    def try_to_connect(module, args) -> None:  # during each warm-up pass, the port must refuse connections
        try:
            socket.create_connection(("127.0.0.1", port), timeout=5).close()
            refused.append(False)
        except ConnectionRefusedError:
            refused.append(True)

    hook = predictor.model.register_forward_pre_hook(try_to_connect)
    try:
        with server:
            hook.remove()
            status, _, body = request(f"{server.url}/healthz")
            health = json.loads(body)
            assert status == 200 and health["status"] == "ok" and health["batches"] == 0  # the warm-up is no batch
            assert refused == [True, True, True] and health["warmup"]["batch_sizes"] == [1, 2, 4]
            if Path("/proc/self/status").is_file():
                assert health["warmup"]["rss_mib_before"] > 0 and health["warmup"]["rss_mib_after"] > 0
            info = json.loads(request(f"{server.url}/v1/model")[2])
            assert info["batching"]["buckets"] == "pow2" and info["batching"]["batch_sizes"] == [1, 2, 4]
    finally:
        hook.remove()


def test_uploads_are_decoded_on_a_bounded_pool(run, images):
    # one thread per request would give each its own malloc arena (RSS growth under load)
    server, predictor = serve(run, max_batch=8, decode_threads=2)
    bodies = [multipart([("image", p.name, p.read_bytes())]) for p in images] * 3
    with server, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda b: request(f"{server.url}/v1/predict", *b), bodies))
        decoders = [t for t in threading.enumerate() if t.name.startswith("vitkit-decode")]
        assert all(status == 200 for status, _, _ in answers) and 1 <= len(decoders) <= 2
        assert json.loads(request(f"{server.url}/v1/model")[2])["batching"]["decode_threads"] == 2
    assert not any(t.is_alive() for t in decoders)  # closed with the app
    with pytest.raises(ValueError, match="decode-threads"):
        Predictor(load_served_model(run=run), decode_threads=0)


def test_an_idle_server_hands_freed_memory_back(run, images, monkeypatch):
    # after serving, once the queue has stayed empty for IDLE_TRIM_S, the worker trims the C heap once
    # (and not again while nothing new is served)
    from vitkit.serve import predictor as module

    assert module.release_memory() is (platform.libc_ver()[0] == "glibc")  # False where there is no glibc
    calls: list[float] = []
    monkeypatch.setattr(module, "release_memory", lambda: calls.append(time.monotonic()) or True)
    monkeypatch.setattr(module, "IDLE_TRIM_S", 0.05)
    predictor = Predictor(load_served_model(run=run), max_batch=4, max_wait_ms=0)
    decoded = [predictor.decode(p.read_bytes(), p.name) for p in images]
    predictor.start()
    try:
        time.sleep(0.3)
        assert calls == []  # the warm-up is not serving
        predictor.submit(decoded[:2]).result(timeout=60)
        deadline = time.monotonic() + 10
        while not calls and time.monotonic() < deadline:
            time.sleep(0.02)
        time.sleep(0.3)
        assert len(calls) == 1 and predictor.stats["memory_trims"] == 1
        predictor.submit(decoded[:1]).result(timeout=60)
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(calls) == 2
    finally:
        predictor.close()
