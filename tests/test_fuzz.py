"""The API contract, fuzzed: Schemathesis (the real CLI) over every operation of the
served OpenAPI document, as the platform admin and as a tenant's admin key, all checks,
coverage + fuzzing + stateful phases (the document links create operations to reads).

Gate: no check fails except `positive_data_acceptance` (ST202: a schema-valid request the
server refuses on semantics the schema cannot say, such as an unknown policy name or an
RE2-invalid pattern: counted and printed, not gated). So: 0 server errors, 0 schema
violations, 0 undocumented statuses or content types, invalid input always refused,
`Allow` right on 405 and OPTIONS.

Bounded here (`NEXUS_FUZZ_EXAMPLES`, default 2 per operation; the tenant key skips the
coverage phase the admin already ran); `make fuzz` runs the full form
(`NEXUS_FUZZ_FULL=1`, 50 examples per operation, every phase for both keys). The services run as real processes
against real NATS and Postgres; chat goes to the fake upstreams of `tests/llm_cluster.py`.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from pathlib import Path

import httpx
import pytest

from tests.conftest import new_database
from tests.llm_cluster import LLMCluster, start_llm_cluster

pytestmark = pytest.mark.slow

ST = Path(sys.executable).with_name("schemathesis")
EXAMPLES = int(os.environ.get("NEXUS_FUZZ_EXAMPLES", "2"))
# printed, not gated: positive_data_acceptance (see the docstring), and ST112 (an answer
# slower than 10 s): a wall-clock check, which a shared 2-core machine cannot hold to
# (docs/reliability.md: the slow answers seen, open); a hang still fails (request timeout)
NOT_GATED = {"ST202", "ST112"}
PROBLEM = "application/problem+json"
FULL = os.environ.get("NEXUS_FUZZ_FULL") == "1"
REPORTS = os.environ.get("NEXUS_FUZZ_REPORTS", "json")  # e.g. `json,vcr`: every request, timed
# the coverage phase's cases (boundaries of every constraint) are the same for both keys:
# bounded, the tenant key runs the random phases only; `make fuzz` runs all three for both
PHASES = {"platform-admin": "coverage,fuzzing,stateful",
          "tenant-admin": "coverage,fuzzing,stateful" if FULL else "fuzzing,stateful"}


@pytest.fixture(scope="module")
def llm(infra, tmp_path_factory):
    cluster = start_llm_cluster(infra, tmp_path_factory.mktemp("fuzz"), new_database(infra))
    try:
        yield cluster
    finally:
        cluster.stop()


def schemathesis(api: str, key: str, report_dir: Path, phases: str) -> dict:
    """One Schemathesis run; its JSON report."""
    started = time.monotonic()
    proc = subprocess.run(
        [str(ST), "run", f"{api}/schema/openapi.json", "-H", f"Authorization: Bearer {key}",
         "--checks", "all", "--phases", phases,
         "--max-examples", str(EXAMPLES), "--workers", "2", "--request-timeout", "30",
         "--no-color", "--report", REPORTS, "--report-dir", str(report_dir)],
        capture_output=True, text=True, timeout=3500 if FULL else 900)
    report = json.loads(next(report_dir.glob("json-*.json")).read_text())
    report["wall_s"] = time.monotonic() - started
    report["output"] = proc.stdout[-20000:] + proc.stderr[-2000:]
    (report_dir / "output.txt").write_text(proc.stdout + proc.stderr)
    report["errors"] = _without_tool_bugs(report["errors"], proc.stdout + proc.stderr)
    report["failures"] = _without_body_limit_refusals(_without_documented_unavailability(
        report["failures"], proc.stdout + proc.stderr), proc.stdout + proc.stderr)
    return report


# Registering an MCP server lists its tools through a node, at the URL or command the
# request names, and this cluster has none: 503 (no node, Retry-After), or 502/504 for a
# server that failed or hung. Documented answers there, not server errors; a 500 still is.
AVAILABILITY = re.compile(r"- ST101 Server error\n\n\[(\d{3})\][^\n]*\n\n\s+`(.*)`")


def _without_documented_unavailability(failures: list[dict], output: str) -> list[dict]:
    found = AVAILABILITY.findall(output)
    every = output.count("- ST101 Server error")
    if every and len(found) == every and all(
            status in ("502", "503", "504") and '"instance":"/v1/mcp-servers"' in body
            for status, body in found):
        print(f"\nfuzz: {every} documented 502/503/504 of MCP server registration, not gated")
        return [f for f in failures if f["code"] != "ST101"]
    return failures


# A body over NEXUS_MAX_BODY_BYTES is refused before it is parsed: 413, a problem naming
# the limit. Schemathesis does not count 413 as a refusal of invalid data (ST201), so a
# generated string long enough to violate a `maxLength` and the body limit at once (a
# megabyte of it, seen once in CI) is refused by the right rule and still reported.
TOO_LARGE = re.compile(r"- ST201 Schema-violating request accepted\n.*?\n\[(\d{3})\][^\n]*\n\n\s+`(.*)`",
                       re.S)


def _without_body_limit_refusals(failures: list[dict], output: str) -> list[dict]:
    found = TOO_LARGE.findall(output)
    every = output.count("- ST201 Schema-violating request accepted")
    if every and len(found) == every and all(
            status == "413" and "/problems/body-too-large" in body for status, body in found):
        print(f"\nfuzz: {every} invalid body(ies) refused by the body limit (413), not gated")
        return [f for f in failures if f["code"] != "ST201"]
    return failures


CPYTHON_AST_RACE = "AST constructor recursion depth mismatch"


def _without_tool_bugs(errors: list[dict], output: str) -> list[dict]:
    """Schemathesis's own errors, less those of CPython 3.11's thread-unsafe `ast.parse`
    (gh-106905), hit inside Hypothesis when two workers describe a lambda at once: an
    error of the fuzzer's process, never of an answer. Printed, not gated."""
    races = output.count(f"SystemError: {CPYTHON_AST_RACE}")
    runtime = sum(e["count"] for e in errors if e["title"] == "Runtime Error")
    if races and races >= runtime:
        print(f"\nfuzzer: {races} runtime error(s) of CPython's ast.parse race, not gated")
        return [e for e in errors if e["title"] != "Runtime Error"]
    return errors


@pytest.mark.timeout(3600 if FULL else 960)  # 60-odd operations: 2-6 min on a busy 2-core machine
@pytest.mark.parametrize("who", ["platform-admin", "tenant-admin"])
def test_schemathesis_finds_no_contract_violation(llm: LLMCluster, who: str,
                                                  tmp_path: Path) -> None:
    if who == "platform-admin":
        key = llm.admin_key
    else:
        key = llm.tenant_key(f"fz{uuid.uuid4().hex[:6]}")["Authorization"].split()[1]
    report = schemathesis(llm.api, key, tmp_path, PHASES[who])
    failures = {f["code"]: f for f in report["failures"]}
    cases = report["test_cases"]
    print(f"\nfuzz [{who}]: {cases['generated']} cases over {report['operations']['tested']} "
          f"operations in {report['wall_s']:.0f} s ({EXAMPLES} examples per operation, "
          f"seed {report['seed']}); "
          f"failures by check: { {c: f['count'] for c, f in failures.items()} or 'none'}")
    gated = {code: f["operations"] for code, f in failures.items() if code not in NOT_GATED}
    assert report["operations"]["tested"] == report["operations"]["total"]
    assert not report["errors"], report["output"]
    assert not gated, f"{gated}\n{report['output']}"
    assert all(report["phases"][p]["status"] != "skip" for p in PHASES[who].split(","))


def test_nul_in_any_text_input_is_a_400_naming_the_field(llm: LLMCluster) -> None:
    admin = llm.admin
    cases = [("get", "/v1/sessions?status=%00abc", None, "status"),
             ("get", "/v1/sessions?agent=a%00", None, "agent"),
             ("get", "/v1/sessions/%00x", None, "session_id"),
             ("post", "/v1/sessions", {"metadata": {"k": "v\u0000"}}, "metadata.k"),
             ("post", "/v1/chat/completions",
              {"model": "default", "messages": [{"role": "user", "content": "a\u0000"}]},
              "messages[0].content")]
    for method, path, body, field in cases:
        resp = httpx.request(method, f"{llm.api}{path}", headers=admin, json=body)
        assert resp.status_code == 400, (path, resp.text)
        assert resp.headers["content-type"].startswith(PROBLEM)
        assert [e["field"] for e in resp.json()["errors"]] == [field], resp.text


def test_unsupported_methods_answer_405_with_allow(llm: LLMCluster) -> None:
    resp = httpx.request("TRACE", f"{llm.api}/v1/sessions", headers=llm.admin)
    assert resp.status_code == 405
    assert set(resp.headers["allow"].replace(" ", "").split(",")) >= {"GET", "POST"}
    options = httpx.options(f"{llm.api}/v1/keys", headers=llm.admin)
    assert set(options.headers["allow"].replace(" ", "").split(",")) == {"GET", "POST", "OPTIONS"}


def test_the_document_declares_errors_constraints_and_links(llm: LLMCluster) -> None:
    doc = httpx.get(f"{llm.api}/schema/openapi.json").json()
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if path.startswith("/v1/"):
                assert {"400", "401"} <= set(op["responses"]), (method, path)
                for status, response in op["responses"].items():
                    if status >= "400":
                        assert PROBLEM in response["content"], (method, path, status)
    chat = doc["paths"]["/v1/chat/completions"]["post"]["responses"]
    assert {"402", "403", "404", "409", "422", "429"} <= set(chat)
    params = {p["name"]: p["schema"] for p in doc["paths"]["/v1/sessions"]["get"]["parameters"]}
    assert params["limit"]["minimum"] == 1
    assert "pattern" in json.dumps(params["cursor"])
    assert "open" in json.dumps(params["status"])
    assert doc["components"]["schemas"]["SessionCreate"]["additionalProperties"] is False
    assert doc["paths"]["/v1/sessions"]["post"]["responses"]["201"]["links"]
