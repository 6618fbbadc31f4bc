"""Local runtime benchmark: `.venv/bin/python bench/runtime.py [--model NAME] [--runs N]`.

The portable llama-server Nexus builds (`GGML_NATIVE=OFF`, CPU kernels for every
feature level loaded at run time: `shared.infra.llama.CMAKE_OPTIONS`) against a build
for this very CPU (`-march=native`, the recipe Nexus used before, which crashed with
SIGILL on other CPUs of the same machine kind), in one run on the same model.

The native build is made once, for this comparison only, and kept in
`NEXUS_CACHE_DIR/llama-server-native/` (up to about 30 minutes on 2 cores the first time; 25 measured); the
node never uses it.

Each server runs alone with 2 threads; each run asks `/completion` for 64 tokens of a
fixed prompt at temperature 0 with the prompt cache off, and the server's own
`timings` give prompt and generation tokens per second. Medians are printed with the
portable/native ratio; numbers are printed, never asserted.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from shared.infra.llama import (  # noqa: E402
    CMAKE_OPTIONS,
    DEFAULT_LOCAL_MODEL,
    NATIVE_CMAKE_OPTIONS,
    ensure_llama_server,
    ensure_model,
)
from shared.infra.process import free_port, stop_process  # noqa: E402

PROMPT = "The history of the printing press begins"


def measure(binary: Path, model: Path, runs: int, tokens: int) -> tuple[list[float], list[float]]:
    port = free_port()
    proc = subprocess.Popen([str(binary), "-m", str(model), "--host", "127.0.0.1", "--port",
                             str(port), "-c", "1024", "-t", "2", "--no-webui"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"{binary} did not start ({proc.returncode})")
            time.sleep(0.2)
        prompt_tps, gen_tps = [], []
        for i in range(runs + 1):  # the first run warms up
            body = json.dumps({"prompt": PROMPT, "n_predict": tokens, "temperature": 0,
                               "cache_prompt": False, "ignore_eos": True}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/completion", data=body,
                                         headers={"Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=300) as r:
                timings = json.loads(r.read())["timings"]
            if i:
                prompt_tps.append(timings["prompt_per_second"])
                gen_tps.append(timings["predicted_per_second"])
        return prompt_tps, gen_tps
    finally:
        stop_process(proc, 10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_LOCAL_MODEL)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()

    def say(message: str) -> None:
        print(f"  {message}", file=sys.stderr)

    model = ensure_model(say, args.model)
    portable = ensure_llama_server(say, options=CMAKE_OPTIONS)
    native = ensure_llama_server(say, options=NATIVE_CMAKE_OPTIONS, flavour="llama-server-native")
    print(f"llama-server portable vs native: {args.model}, {args.runs} runs x {args.tokens} "
          f"tokens, 2 threads, {platform.machine()} {platform.processor() or ''}".rstrip())
    results = {}
    for name, binary in (("native", native), ("portable", portable)):
        results[name] = measure(binary, model, args.runs, args.tokens)
    print(f"{'build':<10} {'prompt tok/s':>14} {'generate tok/s':>15}")
    for name, (p, g) in results.items():
        print(f"{name:<10} {statistics.median(p):>14.1f} {statistics.median(g):>15.1f}")
    (pn, gn), (pp, gp) = results["native"], results["portable"]
    print(f"ratio portable/native: prompt {statistics.median(pp) / statistics.median(pn):.2f}x, "
          f"generate {statistics.median(gp) / statistics.median(gn):.2f}x")


if __name__ == "__main__":
    main()
