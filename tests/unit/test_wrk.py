"""The wrk load runner: parsing its summary, and a real short run against a local JSON server."""

from __future__ import annotations

import json
import shutil
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from benchmarks.wrk import WrkError, parse_output, run_wrk, write_tweets

# What wrk 4.1 printed for a 2 s closed-loop run (text summary, then the Lua done() line).
CAPTURED = """Running 2s test @ http://127.0.0.1:40211/predict
  1 threads and 4 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    45.81ms    8.01ms  55.86ms   91.38%
    Req/Sec    86.30      9.12   100.00     70.00%
  174 requests in 2.02s, 25.66KB read
  Non-2xx or 3xx responses: 3
Requests/sec:     86.26
Transfer/sec:     12.72KB
WRK_JSON {"sent":178,"late":0,"max_late_ms":0,"statuses":{"200":171,"503":3},"threads":1,\
"requests":174,"duration_us":2017263,"latency_us":{"p50":47240,"p90":48070,"p95":51870,\
"p99":55770,"min":1020,"mean":45810.5,"stdev":8010.2,"max":55860},"bytes":26280,\
"errors":{"read":0,"write":0,"status":3,"connect":0,"timeout":0}}
"""


def test_the_summary_line_is_parsed_into_counts_rates_and_percentiles() -> None:
    result = parse_output(CAPTURED, mode="closed", connections=4)
    assert (result.requests, result.ok, result.non_2xx, result.sent) == (174, 171, 3, 178)
    assert result.statuses == {200: 171, 503: 3}
    assert result.errors.status == 3 and result.errors.connect == 0
    assert result.seconds == pytest.approx(2.017, abs=1e-3)
    assert result.rps == pytest.approx(171 / 2.017263, abs=0.1)
    assert (result.p50_ms, result.p95_ms, result.p99_ms) == (47.24, 51.87, 55.77)
    assert result.failed == 3
    assert result.to_dict()["failed"] == 3


def test_a_run_that_printed_no_summary_is_an_error() -> None:
    with pytest.raises(WrkError, match="no WRK_JSON summary"):
        parse_output(
            "unable to connect to 127.0.0.1:9 Connection refused\n", mode="closed", connections=1
        )


def test_tweets_are_written_once_each_as_json_strings(tmp_path: Any) -> None:
    path = write_tweets(['say "hi"', "  ", "naïve\\", 'say "hi"'], tmp_path / "t.jsonl")
    assert [json.loads(line) for line in path.read_text().splitlines()] == ['say "hi"', "naïve\\"]


class _Predict(BaseHTTPRequestHandler):
    """Answers every POST with a prediction per text and records what it was sent."""

    protocol_version = "HTTP/1.1"  # keep-alive, as wrk expects
    disable_nagle_algorithm = True
    seen: list[tuple[list[str], dict[str, str]]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.seen.append((body["texts"], dict(self.headers.items())))
        out = json.dumps({"predictions": [{"label": "neutral"} for _ in body["texts"]]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)

    def log_message(self, *args: Any) -> None:
        pass


class _Server(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # wrk resets its connections when it stops; nothing to report


@pytest.fixture
def predict_server() -> Iterator[tuple[str, list[tuple[list[str], dict[str, str]]]]]:
    if shutil.which("wrk") is None:
        pytest.fail("wrk is not installed: apt-get install wrk", pytrace=False)
    seen: list[tuple[list[str], dict[str, str]]] = []
    handler = type("Handler", (_Predict,), {"seen": seen})
    server = _Server(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/predict", seen
    finally:
        server.shutdown()
        server.server_close()


def test_a_closed_loop_run_sends_unique_single_tweet_requests_without_errors(
    predict_server: tuple[str, list[tuple[list[str], dict[str, str]]]],
) -> None:
    url, seen = predict_server
    tweets = ["good day", 'a "quoted" one', "bad day"]
    result = run_wrk(url, tweets, seconds=2, connections=4, api_key="k-123")
    assert result.requests > 0
    assert result.failed == 0 and result.ok == result.requests
    assert len(seen) >= result.requests
    texts = [body[0] for body, _ in seen]
    assert all(len(body) == 1 for body, _ in seen)
    assert len(set(texts)) == len(texts)  # unique, though only three tweets were given
    assert {text.rsplit(" ", 1)[0] for text in texts} <= set(tweets)  # each a tweet + " <n>"
    headers = {k.lower(): v for k, v in seen[0][1].items()}
    assert headers["content-type"] == "application/json"
    assert headers["cache-control"] == "no-cache"
    assert headers["x-api-key"] == "k-123"


def test_an_open_loop_run_waits_for_its_arrival_times(
    predict_server: tuple[str, list[tuple[list[str], dict[str, str]]]],
) -> None:
    url, seen = predict_server
    result = run_wrk(url, ["one", "two"], seconds=2, rate=50, connections=8)
    assert result.mode == "open" and result.requests > 0 and result.failed == 0
    # Poisson arrivals at 50/s for 2 s: 100 expected, and 160 is six standard deviations above.
    # A slow machine sends fewer; only a script that ignores the rate sends more (thousands).
    assert result.sent <= 160
    assert len({body[0] for body, _ in seen}) == len(seen)
