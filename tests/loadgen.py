"""A bounded V2 inference load, run as its own process: N client threads for S seconds.

    python tests/loadgen.py URL MODEL PIXELS_JSON EXPECTED --clients 8 --seconds 30

Prints one JSON object: requests, errors (non-200, wrong answer, exception) with a few examples,
throughput and latency percentiles in milliseconds. Loopback only: it refuses any other host.
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
from urllib.parse import urlsplit

import requests


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    return sorted_values[min(len(sorted_values) - 1, int(q * len(sorted_values)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("model")
    parser.add_argument("pixels", help="JSON list of 64 numbers")
    parser.add_argument("expected", type=int)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seconds", type=float, default=30)
    a = parser.parse_args()
    if urlsplit(a.url).hostname not in ("127.0.0.1", "localhost", "::1"):
        raise SystemExit("loadgen: loopback only")

    body = {"inputs": [{"name": "predict", "shape": [1, 64], "datatype": "FP32", "data": json.loads(a.pixels)}]}
    endpoint = f"{a.url}/v2/models/{a.model}/infer"
    latencies: list[list[float]] = [[] for _ in range(a.clients)]
    errors: list[str] = []
    start = time.monotonic()
    deadline = start + a.seconds

    def client(i: int) -> None:
        with requests.Session() as s:
            while time.monotonic() < deadline:
                t0 = time.perf_counter()
                try:
                    r = s.post(endpoint, json=body, timeout=30)
                    ok = r.status_code == 200 and int(r.json()["outputs"][0]["data"][0]) == a.expected
                    problem = "" if ok else f"HTTP {r.status_code}: {r.text[:200]}"
                except Exception as exc:  # every failure counts, whatever it is
                    problem = f"{type(exc).__name__}: {exc}"
                latencies[i].append((time.perf_counter() - t0) * 1000)
                if problem:
                    errors.append(problem)

    threads = [threading.Thread(target=client, args=(i,)) for i in range(a.clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.monotonic() - start
    all_ms = sorted(x for per in latencies for x in per)
    print(
        json.dumps(
            {
                "clients": a.clients,
                "seconds": round(elapsed, 2),
                "requests": len(all_ms),
                "errors": len(errors),
                "error_examples": errors[:5],
                "throughput_rps": round(len(all_ms) / elapsed, 1),
                "p50_ms": round(percentile(all_ms, 0.50), 2),
                "p99_ms": round(percentile(all_ms, 0.99), 2),
                "mean_ms": round(statistics.fmean(all_ms), 2) if all_ms else None,
            }
        )
    )


if __name__ == "__main__":
    main()
