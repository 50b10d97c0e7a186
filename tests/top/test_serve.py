"""`lare2 serve` on a tiny trained run: the rows equal `lare2 score`'s, batching leaves them alone, and the
limits answer 401/413/422/503 instead of failing; SIGTERM drains the queue and exits 0."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from tests.helpers.bad_images import GALLERY
from tests.helpers.tiny_run import build_tiny_run

BAD_FILES = {name: GALLERY[name][0] for name in ("zero_byte.png", "truncated.jpg", "not_an_image.png", "bomb.png")}


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[Path, list[Path]]:
    return build_tiny_run(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def detector(tiny_run):
    from lare2 import Detector

    return Detector.from_run(tiny_run[0], device="cpu", num_workers=0, batch_size=16)


def settings(run: Path, **limits):
    from lare2.serve import ServeSettings

    return ServeSettings(run=str(run), device="cpu", workers=0, **limits)


@contextlib.contextmanager
def serving(app):
    """``app`` under uvicorn on a private port, in a thread; yields its base URL and stops it on exit."""
    import uvicorn

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [listener]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(60)
        listener.close()


def upload(paths_or_named: list, **fields) -> dict:
    """Multipart ``files`` parts from paths or (name, bytes) pairs."""
    parts = []
    for item in paths_or_named:
        name, data = (item.name, item.read_bytes()) if isinstance(item, Path) else item
        parts.append(("files", (name, data, "application/octet-stream")))
    return {"files": parts, "data": fields}


def test_rows_equal_lare2_score_on_the_same_files(tiny_run, detector, tmp_path):
    from lare2.cli import app as cli

    run, images = tiny_run
    folder = tmp_path / "files"
    folder.mkdir()
    files = []
    for path in images:  # GenImage-style names: their class prompts come from the names, in both
        files.append(folder / path.name)
        files[-1].write_bytes(path.read_bytes())
    for name, data in BAD_FILES.items():
        files.append(folder / name)
        files[-1].write_bytes(data)
    files.append(folder / "holiday.png")  # a good image whose name gives no class
    files[-1].write_bytes(images[0].read_bytes())
    scored = CliRunner().invoke(cli, ["score", str(run), *map(str, files), "--device", "cpu", "--json",
                                      "--workers", "0", "--batch-size", "16"])
    assert scored.exit_code == 1, scored.output  # some error rows
    expected = json.loads(scored.stdout)

    with serving(build(run, detector)) as url:
        answer = httpx.post(f"{url}/v1/score", timeout=120, **upload(files))
    assert answer.status_code == 200, answer.text
    body = answer.json()
    assert body["run"] == run.name and body["threshold"] == pytest.approx(detector.threshold)
    rows = body["results"]
    assert [r["path"] for r in rows] == [f.name for f in files]  # one row per file, in order, named as uploaded
    assert sum(r["status"] == "ok" for r in rows) == len(images)
    assert "'holiday.png' is not a GenImage-style file name; pass class_name NAME" in rows[-1]["error"]
    for row, want in zip(rows, expected):
        assert set(row) == set(want) and Path(want["path"]).name == row["path"]
        for key in ("is_fake", "threshold", "prompt", "status"):
            assert row[key] == want[key], (row, want)
        # the remedy for a missing class is the service's own field
        assert row["error"] == want["error"].replace("--class-name", "class_name")
        if want["status"] == "ok":
            assert row["p_fake"] == pytest.approx(want["p_fake"], abs=1e-6)
        else:
            assert row["p_fake"] is None and row["error"]


def build(run: Path, detector, **limits):
    from lare2.serve import build_app

    return build_app(settings(run, **limits), detector)


def test_p_fake_does_not_depend_on_the_batch(tiny_run, detector):
    """Three requests queued together are scored as batches of 4 and 3 images (requests and classes mixed);
    each image's p(fake) equals its score alone."""
    from lare2.serve.batching import BatchScorer
    from lare2.serve.metrics import ServeMetrics
    from lare2.shared.classnames import class_name_from_filename

    _, images = tiny_run
    datas, named = [p.read_bytes() for p in images], [class_name_from_filename(p.name) for p in images]
    requests = [(datas[:3], named[:3]), (datas[3:5], ["goldfish"] * 2), (datas[5:] + datas[:1], named[5:] + named[:1])]
    metrics = ServeMetrics()

    async def scored_together():
        scorer = BatchScorer(detector.score, max_batch=4, max_wait_ms=50, max_queue=64, metrics=metrics)
        scorer.start()
        try:  # all three are queued before the worker takes its first batch
            return await asyncio.gather(*(scorer.score(d, classes) for d, classes in requests))
        finally:
            await scorer.close()

    together = [r for rows in asyncio.run(scored_together()) for r in rows]
    assert metrics.registry.get_sample_value("lare2_batch_images_count") == 2
    assert metrics.registry.get_sample_value("lare2_batch_images_sum") == 7
    alone = [detector.score([data], name)[0] for datas_, names in requests for data, name in zip(datas_, names)]
    assert [r.status for r in together] == ["ok"] * 7
    for a, b in zip(together, alone):
        assert a.prompt == b.prompt and a.p_fake == pytest.approx(b.p_fake, abs=1e-5)
    assert [r.prompt for r in together[3:5]] == ["a photo of a goldfish"] * 2
    assert together[6].p_fake == pytest.approx(together[0].p_fake, abs=1e-5)  # the same image in another batch


def test_concurrent_requests_get_their_own_rows(tiny_run, detector):
    from concurrent.futures import ThreadPoolExecutor

    run, images = tiny_run
    alone = {p.name: detector.score([p])[0].p_fake for p in images}
    with serving(build(run, detector, max_batch=8, max_wait_ms=200)) as url:
        with ThreadPoolExecutor(len(images)) as pool:
            answers = list(pool.map(lambda p: httpx.post(f"{url}/v1/score", timeout=120, **upload([p])), images))
        metrics = httpx.get(f"{url}/metrics").text
    for path, answer in zip(images, answers):
        (row,) = answer.json()["results"]
        assert row["path"] == path.name and row["p_fake"] == pytest.approx(alone[path.name], abs=1e-5)
    assert f'lare2_images_scored_total{{status="ok"}} {float(len(images))}' in metrics
    assert metrics_value(metrics, "lare2_batch_images_sum") == len(images)


def metrics_value(text: str, name: str) -> float:
    return float(re.search(rf"^{re.escape(name)} (\S+)$", text, re.M).group(1))


def test_heatmaps_info_health_metrics_and_page(tiny_run, detector):
    from PIL import Image

    from lare2.heatmaps import heatmap_pixels

    run, images = tiny_run
    with serving(build(run, detector)) as url:
        answer = httpx.post(f"{url}/v1/score?heatmaps=true", timeout=120,
                            **upload([images[0], ("empty.png", b"")]))
        info = httpx.get(f"{url}/v1/info").json()
        health, ready = httpx.get(f"{url}/healthz"), httpx.get(f"{url}/readyz")
        metrics = httpx.get(f"{url}/metrics")
        openapi = httpx.get(f"{url}/openapi.json").json()
        docs, page = httpx.get(f"{url}/docs"), httpx.get(f"{url}/")
        swagger_js = httpx.get(f"{url}/docs-assets/swagger-ui-bundle.js")
        statics = {name: httpx.get(f"{url}/static/{name}").text for name in ("page.js", "page.css")}
    ok, bad = answer.json()["results"]
    with Image.open(io.BytesIO(base64.b64decode(ok["heatmap"]))) as heat:
        assert heat.format == "PNG" and heat.size == heatmap_pixels()
    assert bad["status"] == "error" and bad["heatmap"] is None
    assert info["run"] == run.name and info["threshold"] == pytest.approx(detector.threshold)
    assert info["model_fingerprints"] == detector.models.fingerprints and info["prompt_mode"] == "class"
    assert info["extraction_fingerprint"] == detector.config.extraction_fingerprint
    assert info["extraction"]["sd"] == "tiny" and {"torch", "fastapi", "uvicorn"} <= set(info["versions"])
    assert health.json() == {"status": "alive"} and ready.status_code == 200 and ready.json()["ready"]
    text = metrics.text
    assert metrics.headers["content-type"].startswith("text/plain")
    for line in ('lare2_http_requests_total{route="/v1/score",status="200"} 1.0', "lare2_queue_images 0.0",
                 'lare2_images_scored_total{status="error"} 1.0', "lare2_batch_images_count 1.0"):
        assert line in text, line
    assert 'lare2_http_request_seconds_count{route="/v1/info"} 1.0' in text
    assert "/v1/score" in openapi["paths"] and docs.status_code == 200
    # the OpenAPI page works offline: its scripts come from the app, never a CDN
    assert "/docs-assets/swagger-ui-bundle.js" in docs.text and "https://" not in docs.text.split("<body>")[0]
    assert swagger_js.status_code == 200 and "SwaggerUIBundle" in swagger_js.text
    assert page.status_code == 200 and 'src="/static/page.js"' in page.text
    for name, source in {"index.html": page.text, **statics}.items():  # offline: nothing from elsewhere
        assert not re.search(r"https?:|//[a-z]", source) and ".innerHTML" not in source, name


def test_limits_answer_instead_of_failing(tiny_run, detector):
    run, images = tiny_run
    with serving(build(run, detector, max_upload_mb=0.25)) as url:
        port = int(url.rsplit(":", 1)[1])
        assert httpx.post(f"{url}/v1/score", data={"class_name": "goldfish"}).status_code == 422
        no_class = httpx.post(f"{url}/v1/score", **upload([images[0]], class_name="goldfisch"))
        assert no_class.status_code == 422 and "goldfish" in no_class.json()["detail"]  # the closest names
        no_files = httpx.post(f"{url}/v1/score", files=[("files", ("", b"", "application/octet-stream"))])
        assert no_files.status_code == 422  # what a form with no file chosen sends
        too_big = httpx.post(f"{url}/v1/score", **upload([("big.png", b"\0" * 300_000)]))
        assert too_big.status_code == 413 and "0.25 MiB" in too_big.json()["detail"]
        # a declared length over the limit is refused from the headers: nothing of the body is sent
        with socket.create_connection(("127.0.0.1", port), timeout=30) as raw:
            raw.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                        b"Content-Length: 50000000\r\n\r\n")
            assert raw.recv(4096).startswith(b"HTTP/1.1 413")
        assert httpx.get(f"{url}/healthz").status_code == 200  # and the server is fine


def test_a_body_without_length_is_counted_and_refused_unread(tiny_run, detector):
    run, _ = tiny_run
    app = build(run, detector, max_upload_mb=0.25)
    sent = []

    async def body():
        yield b"--b\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n\r\n"
        for _ in range(64):  # 4 MiB in 64 KiB pieces, no Content-Length (chunked)
            sent.append(1)
            yield b"\0" * 65536

    async def post():
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://lare2") as client:
                return await client.post("/v1/score", content=body(),
                                         headers={"Content-Type": "multipart/form-data; boundary=b"})

    answer = asyncio.run(post())
    assert answer.status_code == 413 and len(sent) < 64 // 4 + 2  # stopped right after 0.25 MiB


def test_a_token_guards_every_route_but_healthz(tiny_run, detector, tmp_path):
    run, images = tiny_run
    app = build(run, detector, token="s3cret-token")
    with serving(app) as url:
        for route in ("/v1/info", "/readyz", "/metrics", "/", "/docs", "/static/page.js"):
            refused = httpx.get(url + route)
            assert refused.status_code == 401 and refused.headers["www-authenticate"].startswith("Bearer"), route
        assert httpx.get(f"{url}/v1/info", headers={"Authorization": "Bearer wrong"}).status_code == 401
        assert httpx.post(f"{url}/v1/score", **upload([images[0]])).status_code == 401
        assert httpx.get(f"{url}/healthz").status_code == 200
        good = {"Authorization": "Bearer s3cret-token"}
        assert httpx.get(f"{url}/v1/info", headers=good).status_code == 200
        scored = httpx.post(f"{url}/v1/score", headers=good, timeout=120, **upload([images[0]]))
        assert scored.status_code == 200 and scored.json()["results"][0]["status"] == "ok"


def test_a_full_queue_answers_503_with_retry_after(tiny_run, detector):
    from concurrent.futures import ThreadPoolExecutor

    run, images = tiny_run
    # the first request's 2 images wait 3 s for a batch to fill: meanwhile the queue (2 images) is full
    with serving(build(run, detector, max_queue=2, max_batch=64, max_wait_ms=3000)) as url:
        with ThreadPoolExecutor(1) as pool:
            first = pool.submit(httpx.post, f"{url}/v1/score", timeout=120, **upload(images[:2]))
            wait_for(lambda: httpx.get(f"{url}/readyz").status_code == 503, "the queue to fill")
            refused = httpx.post(f"{url}/v1/score", **upload(images[2:3]))
            assert first.result().status_code == 200
        assert [r["status"] for r in first.result().json()["results"]] == ["ok", "ok"]
        assert httpx.get(f"{url}/readyz").status_code == 200
        too_many = httpx.post(f"{url}/v1/score", **upload(images[:3]))  # could never fit
        metrics = httpx.get(f"{url}/metrics").text
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert too_many.status_code == 413 and "max-queue" in too_many.json()["detail"]
    assert 'lare2_http_requests_total{route="/v1/score",status="503"} 1.0' in metrics


def test_uploads_in_flight_are_bounded_together(tiny_run, detector):
    """Two uploads within --max-upload-mb but over --max-inflight-mb together: the second is a 503, unread,
    while the first holds its bytes; once the first is answered, the same upload fits."""
    run, _ = tiny_run
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
    body = part + b"\0" * 400_000 + b"\r\n--b--\r\n"
    second = upload([("big.png", b"\0" * 400_000)])
    with serving(build(run, detector, max_upload_mb=0.5, max_inflight_mb=0.75)) as url:
        port = int(url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=60) as first:
            first.sendall(b"POST /v1/score HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Content-Type: multipart/form-data; boundary=b\r\n"
                          b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
            wait_for(lambda: metrics_value(httpx.get(f"{url}/metrics").text, "lare2_upload_bytes_in_flight")
                     == len(body), "the first upload to hold its bytes")
            refused = httpx.post(f"{url}/v1/score", timeout=60, **second)
            first.sendall(body[1000:])
            answer = b"".join(iter(lambda: first.recv(65536), b""))
        assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
        assert metrics_value(httpx.get(f"{url}/metrics").text, "lare2_upload_bytes_in_flight") == 0
        again = httpx.post(f"{url}/v1/score", timeout=60, **second)
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1
    assert "--max-inflight-mb" in refused.json()["detail"]
    assert again.status_code == 200 and again.json()["results"][0]["status"] == "error"


def wait_for(condition, what: str, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=5).close()
    except ConnectionRefusedError:
        return True
    return False


@pytest.mark.slow
def test_sigterm_stops_accepting_finishes_the_queue_and_exits_0(tiny_run, detector, tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    run, images = tiny_run
    log = open(tmp_path / "server.log", "wb")
    server = subprocess.Popen([sys.executable, "-m", "lare2.serve.cli", str(run), "--port", "0",
                               "--device", "cpu", "--max-batch", "64", "--max-wait-ms", "5000"],
                              stdout=subprocess.PIPE, stderr=log, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        # the server says where it listens (the port it was given for --port 0), then the access log follows
        said = server.stdout.readline().decode()
        drain = threading.Thread(target=lambda: log.write(server.stdout.read()), daemon=True)
        drain.start()
        heard = re.fullmatch(r"listening on http://127\.0\.0\.1:(\d+)/ \(run (\S+), threshold (\S+)\)\n", said)
        assert heard and heard[2] == run.name and float(heard[3]) == pytest.approx(detector.threshold, rel=1e-3), said
        port, url = int(heard[1]), f"http://127.0.0.1:{heard[1]}"
        wait_for(lambda: server.poll() is None and not refused(port), "the server to listen", 120)
        with ThreadPoolExecutor(2) as pool:
            pending = [pool.submit(httpx.post, f"{url}/v1/score", timeout=120, **upload(images[i:i + 2]))
                       for i in (0, 2)]
            wait_for(lambda: "lare2_queue_images 4.0" in httpx.get(f"{url}/metrics").text, "4 queued images")
            server.send_signal(signal.SIGTERM)
            wait_for(lambda: refused(port), "the server to stop accepting")
            assert not any(p.done() for p in pending)  # still waiting for their batch while new ones are refused
            answers = [p.result() for p in pending]
        assert server.wait(120) == 0
        drain.join(60)
    finally:
        if server.poll() is None:
            server.kill()
        log.close()
    for answer, names in zip(answers, (images[0:2], images[2:4])):
        assert answer.status_code == 200
        assert [(r["path"], r["status"]) for r in answer.json()["results"]] == [(p.name, "ok") for p in names]
    assert "Application shutdown complete" in (tmp_path / "server.log").read_text()


def test_the_command_refuses_bad_input_in_one_line(tiny_run, tmp_path, capsys):
    from lare2.serve.cli import main

    run, _ = tiny_run
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        cases = {
            "cannot listen there": [str(run), "--port", port],
            "no such token file": [str(run), "--port", "0", "--token-file", str(tmp_path / "none")],
            str(tmp_path / "no-run"): [str(tmp_path / "no-run"), "--port", "0"],
        }
        for why, argv in cases.items():
            assert main([*argv, "--device", "cpu"]) == 2, why
            errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
            assert len(errors) == 1 and why in errors[0], (why, errors)
