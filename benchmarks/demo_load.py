"""The demo's JSON API under load, on loopback: N concurrent clients, one search each, bounded in time.

    python benchmarks/demo_load.py --index indexes/stanford_crops --clients 50
    python benchmarks/demo_load.py --url http://127.0.0.1:7860 --clients 5   # a server already running here

With ``--index`` it starts ``carsearch demo INDEX`` itself on a free loopback port (and stops it); ``--url``
takes a server on 127.0.0.1 only. Photos: the shared street photos with cars (``../shared/data/street``),
cycled over the clients. First one search at a time (``--single`` searches, after a warm-up): the latency of
one search without maps; then ``--clients`` concurrent clients, one ``POST /api/v1/search`` each, all started
together, each with the total ``--timeout``: latency p50 / p95 / max, answers, errors; then the server's RSS
(psutil, with its children). Writes ``benchmarks/results/demo_load-cpu.json`` with the command and machine.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import httpx
import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
STREET = ROOT.parent / "shared" / "data" / "street"
OUT = ROOT / "benchmarks" / "results" / "demo_load-cpu.json"


def street_photos() -> list[Path]:
    """The shared street photos marked ``yes`` (at least one clearly visible car)."""
    with (STREET / "street.csv").open() as handle:
        return [STREET / row["path"] for row in csv.DictReader(handle) if row["vehicles"] == "yes"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_server(index: str, port: int, log: Path) -> subprocess.Popen:
    command = [sys.executable, "-m", "carsearch.cli", "demo", index, "--port", str(port)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with log.open("w") as handle:
        process = subprocess.Popen(command, cwd=ROOT, stdout=handle, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the demo exited ({process.returncode}):\n{log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=5).status_code == 200:
                return process
        except httpx.HTTPError:
            pass
        time.sleep(1)
    process.kill()
    raise SystemExit("the demo did not start within 300 s")


def server_pid(port: int) -> int | None:
    """The process listening on ``port`` on this machine."""
    for conn in psutil.net_connections(kind="inet"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr.port == port and conn.pid:
            return int(conn.pid)
    return None


def rss_mb(pid: int) -> float:
    process = psutil.Process(pid)
    return sum(p.memory_info().rss for p in [process, *process.children(recursive=True)]) / 2**20


def search(url: str, photo: Path, k: int, timeout: float) -> tuple[float, int, str]:
    """(seconds, HTTP status or 0 for a transport error, error text)."""
    tic = time.perf_counter()
    try:
        with photo.open("rb") as handle:
            response = httpx.post(
                f"{url}/api/v1/search", params={"k": k}, files={"image": (photo.name, handle)}, timeout=timeout
            )
        ok = response.status_code == 200 and "hits" in response.json()
        return time.perf_counter() - tic, response.status_code, "" if ok else response.text[:200]
    except (httpx.HTTPError, ValueError) as exc:
        return time.perf_counter() - tic, 0, f"{type(exc).__name__}: {exc}"


def percentiles(seconds: list[float]) -> dict[str, float]:
    values = np.array(seconds)
    return {
        "p50_s": round(float(np.percentile(values, 50)), 3),
        "p95_s": round(float(np.percentile(values, 95)), 3),
        "max_s": round(float(values.max()), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--index", help="start `carsearch demo INDEX` on a free loopback port")
    where.add_argument("--url", help="a running demo on 127.0.0.1, e.g. http://127.0.0.1:7860")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients, one search each")
    parser.add_argument("--single", type=int, default=5, help="searches one at a time first (latency alone)")
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--timeout", type=float, default=300.0, help="total seconds for the concurrent run")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    photos = street_photos()
    process = None
    if args.index:
        port = free_port()
        process = start_server(args.index, port, Path("/tmp") / f"demo_load_{port}.log")
        url = f"http://127.0.0.1:{port}"
    else:
        parsed = urlparse(args.url)
        if parsed.hostname not in ("127.0.0.1", "localhost") or parsed.port is None:
            raise SystemExit("--url must be http://127.0.0.1:PORT (loopback only)")
        url, port = args.url.rstrip("/"), parsed.port
    pid = process.pid if process is not None else server_pid(port)
    try:
        search(url, photos[0], args.k, 120)  # warm-up: first-call costs (runtime sessions, caches)
        rss_before = rss_mb(pid) if pid else None
        single = [search(url, photos[i % len(photos)], args.k, 120) for i in range(args.single)]
        tic = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            futures = [
                pool.submit(search, url, photos[i % len(photos)], args.k, args.timeout) for i in range(args.clients)
            ]
            results = [f.result() for f in futures]
        wall = time.perf_counter() - tic
        time.sleep(1)
        rss_after = rss_mb(pid) if pid else None
    finally:
        if process is not None:
            process.terminate()
            process.wait(30)
    answered = [r for r in results if r[1] == 200 and not r[2]]
    report = {
        "command": "python " + " ".join(shlex.quote(a) for a in sys.argv),
        "machine": {
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(),
        },
        "index": args.index,
        "photos": len(photos),
        "k": args.k,
        "single": {"searches": args.single, **percentiles([r[0] for r in single])},
        "concurrent": {
            "clients": args.clients,
            "answered": len(answered),
            "errors": len(results) - len(answered),
            "error_samples": sorted({r[2] for r in results if r[2]})[:5],
            "wall_s": round(wall, 2),
            **percentiles([r[0] for r in results]),
        },
        "server_rss_mb": {
            "after_warmup": rss_before and round(rss_before),
            "after_run": rss_after and round(rss_after),
        },
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
