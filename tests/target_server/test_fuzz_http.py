"""serve_target's HTTP endpoints under hostile requests (bounded mutation fuzz, real sockets)."""

from __future__ import annotations

import random
import time

from modelopt_ext.bench import fuzz


def test_hostile_requests_get_4xx_one_line_errors_and_the_server_stays_healthy(server):
    out = fuzz.Outcomes("http")
    start = time.monotonic()
    fuzz.fuzz_http(server.url)(random.Random("http"), start + 4.0, out)
    out.seconds = time.monotonic() - start
    print(fuzz.format_table([out]))
    assert out.tried >= 20 and out.clean > 0
    assert out.crash_count == 0, fuzz.format_table([out])
