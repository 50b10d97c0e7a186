"""`lare2 serve` under load on this machine -> ``OUT/serve.json`` + ``OUT/serve.md`` (``make bench``).

A tiny trained run (tiny models, one epoch) is served by ``lare2 serve`` in a subprocess on a
private localhost port, with its defaults except ``--max-queue`` (small, so that the overload phase
reaches it within seconds). Closed-loop clients each post one image per request and wait for the
answer. Figures:

- throughput at 8 clients, images/s, over ``Detector.score`` on the same images in this process
  (one call; the ratio is what serving keeps of the model's own speed, HTTP and batching included),
  side by side in rounds, the median of the per-round ratios;
- latency p50/p95/p99 at 1, 8 and 32 clients;
- 4x overload, in rounds: requests sent open loop at 4x the measured throughput: the share answered 503
  (with and without Retry-After), every other status counted (no other 5xx is the goal), the
  server's RSS before any load, after the closed-loop phases and after each overload round, and
  ``/healthz`` after.

Bounded: every phase stops at its request count or its time limit, whichever comes first. Requests
carry ``class_name`` (one class, as the direct call does): with class prompts, a batch is one model
call per distinct class.
"""

from __future__ import annotations

import asyncio
import datetime
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # run as a script: the repository root makes ``bench.*`` and ``tests.*`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import typer

CLASS_NAME = "goldfish"
LEVELS = (1, 8, 32)
"""Concurrent clients of the latency phases."""


def _log(message: str) -> None:
    from lare2.shared.logs import console

    console.log(message)


def image_bytes(count: int) -> list[bytes]:
    """``count`` distinct small PNGs of random pixels."""
    from tests.helpers.bad_images import good_rgb

    return [good_rgb(seed=1000 + i, size=(64 + i % 5, 64)) for i in range(count)]


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentiles(seconds: list[float]) -> dict:
    if not seconds:
        return {}
    p50, p95, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 95, 99])
    return {"p50_ms": round(float(p50), 1), "p95_ms": round(float(p95), 1), "p99_ms": round(float(p99), 1)}


async def post(client, url: str, data: bytes, index: int) -> tuple[int, float, bool]:
    """(status, seconds, has Retry-After) of one single-image request; status 0: no answer."""
    import httpx

    started = time.perf_counter()
    try:
        answer = await client.post(url, files=[("files", (f"img_{index}.png", data, "image/png"))],
                                   data={"class_name": CLASS_NAME})
        return answer.status_code, time.perf_counter() - started, "retry-after" in answer.headers
    except httpx.HTTPError:
        return 0, time.perf_counter() - started, False


async def closed_loop(url: str, images: list[bytes], clients: int, requests: int, seconds: float) -> dict:
    """``clients`` each posting one image at a time until ``requests`` were sent or ``seconds`` passed."""
    import httpx

    results: list[tuple[int, float, bool]] = []
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client_loop(client) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            index, sent = sent, sent + 1
            results.append(await post(client, url, images[index % len(images)], index))

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client) for _ in range(clients)))
        wall = time.perf_counter() - started
    ok = [s for status, s, _ in results if status == 200]
    return {"clients": clients, "requests": len(results), "ok": len(ok), "seconds": round(wall, 2),
            "images_per_s": round(len(ok) / wall, 2), **percentiles(ok)}


async def open_loop(url: str, images: list[bytes], rate: float, seconds: float) -> dict:
    """Requests sent every ``1 / rate`` s for ``seconds``, whatever the answers: the statuses they got."""
    import httpx

    limits = httpx.Limits(max_connections=1000, max_keepalive_connections=100)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        tasks, started, index = [], time.perf_counter(), 0
        while time.perf_counter() - started < seconds:
            tasks.append(asyncio.create_task(post(client, url, images[index % len(images)], index)))
            index += 1
            await asyncio.sleep(max(0.0, started + index / rate - time.perf_counter()))
        results = await asyncio.gather(*tasks)
    statuses: dict[str, int] = {}
    for status, _, _ in results:
        statuses[str(status)] = statuses.get(str(status), 0) + 1
    refused = [r for r in results if r[0] == 503]
    return {"rate_per_s": round(rate, 2), "seconds": seconds, "requests": len(results), "statuses": statuses,
            "share_503": round(len(refused) / len(results), 3),
            "share_503_with_retry_after": round(sum(r[2] for r in refused) / len(results), 3),
            "other_5xx": sum(v for k, v in statuses.items() if k.startswith("5") and k != "503"),
            "no_answer": statuses.get("0", 0), **percentiles([s for status, s, _ in results if status == 200])}


def direct_rate(detector, images: list[bytes]) -> dict:
    """``Detector.score`` on the images in one call (batch 16 = --max-batch, decode inline, as the service)."""
    detector.score(images[:16], CLASS_NAME)  # warm up
    started = time.perf_counter()
    rows = detector.score(images, CLASS_NAME)
    seconds = time.perf_counter() - started
    assert all(r.status == "ok" for r in rows)
    return {"images": len(images), "seconds": round(seconds, 2), "images_per_s": round(len(images) / seconds, 2)}


def start_server(run: Path, max_queue: int, log: Path) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "lare2.serve.cli", str(run), "--port", str(port), "--device", "cpu",
               "--max-queue", str(max_queue)]
    with open(log, "wb") as out:  # the child keeps its own copy of the descriptor
        server = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 180
    while True:
        if server.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"lare2 serve did not start; see {log}")
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return server, url
        except httpx.HTTPError:
            time.sleep(0.5)


def measure(run: Path, images: list[bytes], work: Path, max_queue: int, requests_per_client: int,
            phase_seconds: float, overload_seconds: float, rounds: int, overload_rounds: int) -> dict:
    import httpx

    from lare2 import Detector

    results: dict = {"server": {"max_queue": max_queue, "max_batch": 16, "max_wait_ms": 10.0, "workers": 0}}
    detector = Detector.from_run(run, device="cpu", num_workers=0, batch_size=16)  # as the service loads it
    server, url = start_server(run, max_queue, work / "server.log")
    score_url = f"{url}/v1/score"
    try:
        asyncio.run(closed_loop(score_url, images, 2, 4, 60))  # warm up
        results["rss_mib"] = {"before": round(rss_mib(server.pid), 1)}
        _log(f"served at 8 clients / Detector.score, {rounds} rounds")
        results["ratio_rounds"] = []
        for _ in range(rounds):  # side by side, round after round: the machine's load drifts
            direct = direct_rate(detector, images)
            served = asyncio.run(closed_loop(score_url, images, 8, len(images), phase_seconds))
            results["ratio_rounds"].append({"direct_images_per_s": direct["images_per_s"],
                                            "served_images_per_s": served["images_per_s"],
                                            "ratio": round(served["images_per_s"] / direct["images_per_s"], 3)})
        results["served_over_direct_at_8"] = float(np.median([r["ratio"] for r in results["ratio_rounds"]]))
        results["levels"] = []
        for clients in LEVELS:
            _log(f"latency at {clients} clients")
            results["levels"].append(asyncio.run(closed_loop(score_url, images, clients,
                                                             clients * requests_per_client, phase_seconds)))
        results["rss_mib"]["after_closed_loop"] = round(rss_mib(server.pid), 1)
        capacity = float(np.median([r["served_images_per_s"] for r in results["ratio_rounds"]]))
        results["overload"] = []
        for _ in range(overload_rounds):  # RSS after each round shows whether it keeps growing
            _log(f"4x overload for {overload_seconds:g} s")
            results["overload"].append(asyncio.run(open_loop(score_url, images, 4 * capacity, overload_seconds)))
            results["overload"][-1]["rss_mib_after"] = round(rss_mib(server.pid), 1)
        time.sleep(1)
        results["healthz_after"] = httpx.get(f"{url}/healthz", timeout=30).status_code
    finally:
        server.send_signal(signal.SIGTERM)
        results["exit_code_after_sigterm"] = server.wait(180)
    return results


def markdown(r: dict) -> str:
    rounds = ", ".join(f"{x['ratio']} ({x['served_images_per_s']} vs {x['direct_images_per_s']} img/s)"
                       for x in r["ratio_rounds"])
    lines = ["# `lare2 serve` under load", "", f"Machine: {r['machine']}; load average (1, 5, 15 min) "
             f"{r['load_average_at_start']} at the start", "",
             f"Date: {r['date']}; command: `{r['command']}`; {r['seconds']} s", "",
             f"Server: tiny run, `lare2 serve` defaults (max batch {r['server']['max_batch']}, max wait "
             f"{r['server']['max_wait_ms']:g} ms, decode on the model thread) except "
             f"--max-queue {r['server']['max_queue']}; "
             "one image per request; clients on the same machine", "", "| figure | value |", "| --- | --- |",
             f"| served at 8 clients / Detector.score (one call, same images) | {r['served_over_direct_at_8']} "
             f"(median of rounds: {rounds}) |"]
    for level in r["levels"]:
        lines.append(f"| {level['clients']} client(s), {level['ok']} requests | {level['images_per_s']} img/s; latency "
                     f"p50 {level['p50_ms']} / p95 {level['p95_ms']} / p99 {level['p99_ms']} ms |")
    for i, o in enumerate(r["overload"], 1):
        lines.append(f"| 4x overload, round {i} ({o['rate_per_s']} req/s open loop for {o['seconds']:g} s, "
                     f"{o['requests']} requests) | 503: {100 * o['share_503']:.1f}% "
                     f"({100 * o['share_503_with_retry_after']:.1f}% with Retry-After); statuses {o['statuses']}; "
                     f"other 5xx: {o['other_5xx']}; no answer: {o['no_answer']}; server RSS after: "
                     f"{o['rss_mib_after']} MiB |")
    lines += [f"| server RSS | {r['rss_mib']['before']} MiB before load, {r['rss_mib']['after_closed_loop']} after the "
              "closed-loop phases |",
              f"| /healthz after the overload | {r['healthz_after']} |",
              f"| exit code after SIGTERM | {r['exit_code_after_sigterm']} |"]
    return "\n".join(lines) + "\n"


def run(
    out: Path = typer.Option(Path("bench/results"), "--out", help="Folder for serve.json and serve.md."),
    images: int = typer.Option(48, help="Distinct images the clients cycle through (and the direct call scores)."),
    requests_per_client: int = typer.Option(6, help="Requests per client in each closed-loop phase."),
    phase_seconds: float = typer.Option(60.0, help="Time limit of each closed-loop phase."),
    overload_seconds: float = typer.Option(10.0, help="Length of the 4x overload phase."),
    max_queue: int = typer.Option(32, help="The server's --max-queue."),
    rounds: int = typer.Option(3, help="Rounds of the served / direct ratio (the median is reported)."),
    overload_rounds: int = typer.Option(3, help="Rounds of the 4x overload (RSS after each)."),
) -> None:
    """Measure `lare2 serve` on this machine and write the figures."""
    import torch

    from tests.helpers.tiny_run import build_tiny_run

    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    results: dict = {
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} threads",
        "load_average_at_start": [round(v, 2) for v in os.getloadavg()],
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python", *sys.argv])}
    with tempfile.TemporaryDirectory(prefix="lare2-bench-serve-") as tmp:
        work = Path(tmp)
        _log("training a tiny run")
        run_dir, _ = build_tiny_run(work)
        results.update(measure(run_dir, image_bytes(images), work, max_queue, requests_per_client,
                               phase_seconds, overload_seconds, rounds, overload_rounds))
    results["seconds"] = round(time.perf_counter() - started, 1)
    (out / "serve.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "serve.md").write_text(markdown(results))
    _log(f"wrote {out / 'serve.json'} and {out / 'serve.md'}")
    print(markdown(results))


def main(argv: list[str] | None = None) -> None:
    app = typer.Typer(add_completion=False, pretty_exceptions_show_locals=False)
    app.command()(run)
    app(args=argv, prog_name="bench/serve.py")


if __name__ == "__main__":
    main()
