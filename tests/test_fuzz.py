"""Property-based fuzzing of the running service (benchmarks/fuzz_api.py: hypothesis over the
service's own OpenAPI schema), bounded to a few hundred cases: no 5xx, every 200 a valid PNG, and
the server still answers a valid request afterwards."""
import pytest

from benchmarks.fuzz_api import fuzz

pytestmark = pytest.mark.slow  # a server in a subprocess, a few hundred requests


def test_fuzzed_requests_never_get_a_5xx(server):
    res = fuzz(server.url, server.key, cases=300, seed=0)
    assert res["cases"] == 300
    assert res["5xx"] == 0 and res["transport_errors"] == 0 and res["invalid_200"] == 0, res["failures"]
    assert res["valid_request_after"], res
    assert int(res["status"].get("200", 0)) >= 20 and int(res["status"].get("400", 0)) >= 50, res["status"]
    assert {"401", "415"} <= set(res["status"]), res["status"]
