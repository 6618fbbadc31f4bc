"""The runtime build's smoke test (shared.infra.llama): a CPU-kernel variant that dies
of SIGILL on this machine is dropped and the next best is tried; a build whose every
variant dies is not cached.

`llama-server` is a stand-in script here, with llama.cpp's loader habit: it loads the
best CPU variant whose library is present (`libggml-cpu-<variant>.so`, best first in
`RANKED`) and that this "CPU" can load (not in `unloadable`), says so when `names` (the
real binary does not always), and then runs that variant's "kernels": a variant listed
in `crashes` dies of SIGILL (kill -ILL), any other answers `/completion` as llama-server
does; with no loadable variant it exits with an error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from shared.infra.llama import IllegalInstruction, RuntimeBuildError, _smoke_test_variants

RANKED = ("zen5", "sapphirerapids", "icelake", "haswell", "x64")

STAND_IN = '''
import http.server, json, os, signal, sys
here = os.path.dirname(os.path.abspath(__file__))
ranked, crashes, unloadable, names = {ranked!r}, {crashes!r}, {unloadable!r}, {names!r}
variant = next((v for v in ranked if v not in unloadable
                and os.path.exists(os.path.join(here, f"libggml-cpu-{{v}}.so"))), None)
if variant is None:
    sys.exit("no CPU backend could be loaded")
if names:
    print(f"load_backend: loaded CPU backend from {{here}}/libggml-cpu-{{variant}}.so", flush=True)
if variant in crashes:
    os.kill(os.getpid(), signal.SIGILL)


class Handler(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        body = json.dumps({{"content": "Hi", "tokens_predicted": 1}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


port = int(sys.argv[sys.argv.index("--port") + 1])
http.server.HTTPServer(("127.0.0.1", port), Handler).serve_forever()
'''


def staged_build(directory: Path, crashes: tuple[str, ...], *, names: bool = True,
                 unloadable: tuple[str, ...] = ("zen5",)) -> Path:
    """A staged build: the stand-in binary and one library per variant."""
    directory.mkdir()
    binary = directory / "llama-server"
    binary.write_text(f"#!{sys.executable}\n" + STAND_IN.format(
        ranked=RANKED, crashes=crashes, unloadable=unloadable, names=names))
    binary.chmod(0o755)
    for variant in RANKED:
        (directory / f"libggml-cpu-{variant}.so").write_bytes(b"")
    (directory / "libggml-base.so").write_bytes(b"")
    return directory


def variants(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.glob("libggml-cpu-*.so"))


@pytest.mark.parametrize("names", [True, False], ids=["named-by-the-binary", "found-one-by-one"])
def test_a_variant_that_dies_of_sigill_here_is_dropped_and_the_next_best_kept(
        tmp_path, names: bool) -> None:
    staged = staged_build(tmp_path / "staged", crashes=("sapphirerapids", "icelake"), names=names)
    said: list[str] = []
    _smoke_test_variants(staged, tmp_path / "model.gguf", said.append)
    # the two that die are gone (zen5, never loadable here, is no reason to fail); the
    # best that runs here is what the loader now picks
    assert variants(staged) == ["libggml-cpu-haswell.so", "libggml-cpu-x64.so",
                                "libggml-cpu-zen5.so"]
    assert (staged / "libggml-base.so").exists() and not (staged / "aside").exists()
    dropped = " ".join(line for line in said if "dropped" in line)
    assert "libggml-cpu-sapphirerapids.so" in dropped and "libggml-cpu-icelake.so" in dropped


def test_a_build_whose_every_variant_dies_is_refused(tmp_path) -> None:
    staged = staged_build(tmp_path / "staged", crashes=RANKED, unloadable=())
    with pytest.raises(IllegalInstruction) as caught:
        _smoke_test_variants(staged, tmp_path / "model.gguf", lambda _: None)
    assert "SIGILL" in str(caught.value) and caught.value.cpu_backend.endswith("libggml-cpu-x64.so")
    assert variants(staged) == ["libggml-cpu-x64.so"]  # the last one is never dropped


def test_a_build_that_runs_keeps_every_variant(tmp_path) -> None:
    staged = staged_build(tmp_path / "staged", crashes=())
    _smoke_test_variants(staged, tmp_path / "model.gguf", lambda _: None)
    assert len(variants(staged)) == len(RANKED)


def test_a_crash_that_is_no_sigill_is_not_a_variant_to_drop(tmp_path) -> None:
    staged = staged_build(tmp_path / "staged", crashes=())
    binary = staged / "llama-server"
    binary.write_text("#!/bin/sh\nexit 3\n")
    with pytest.raises(RuntimeBuildError) as caught:
        _smoke_test_variants(staged, tmp_path / "model.gguf", lambda _: None)
    assert not isinstance(caught.value, IllegalInstruction)
    assert len(variants(staged)) == len(RANKED)
