"""The dashboard's client libraries, taken from the npm registry at install time.

htmx and its SSE extension are pinned here by version and by the registry's published
`integrity` (sha512 of the tarball); `nexus ui assets` (run by `make up` / `make test`)
downloads each tarball once, checks that digest, and keeps the one file we serve under
`<NEXUS_CACHE_DIR>/ui/`. Nothing is copied into the repository and no Node toolchain is
involved; the orchestrator only reads the cache (it never reaches the network).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import tarfile
import urllib.request
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Asset:
    name: str        # served as /ui/assets/<name>
    package: str
    version: str
    integrity: str   # the registry's `dist.integrity` of the tarball
    member: str      # the file inside the tarball

    @property
    def tarball(self) -> str:
        return (f"https://registry.npmjs.org/{self.package}/-/"
                f"{self.package.rsplit('/', 1)[-1]}-{self.version}.tgz")


ASSETS: tuple[Asset, ...] = (
    Asset("htmx.min.js", "htmx.org", "2.0.11",
          "sha512-Thx/WtpeOQqSrqBCw/A1cwGJGg4UrVa3+sW0GmrM3p4gJgO89ecH4qtbnyzDDWFvBTqjnIMCgELTNt636dtamA==",
          "package/dist/htmx.min.js"),
    Asset("sse.js", "htmx-ext-sse", "2.2.4",
          "sha512-LJmxVhykyflBWgh5PvbRidcyuqMHlgfajmmzumvKctv9puvsufeH6OaejSMZTNTnEI8O2wXXn4ZZtBdpEMqmEQ==",
          "package/dist/sse.js"),
)
BY_NAME = {a.name: a for a in ASSETS}


class AssetError(Exception):
    pass


def asset_dir(cache_dir: Path) -> Path:
    return cache_dir / "ui"


def asset_path(cache_dir: Path, asset: Asset) -> Path:
    return asset_dir(cache_dir) / f"{asset.package}-{asset.version}" / asset.name


def check_integrity(data: bytes, integrity: str) -> None:
    algo, _, expected = integrity.partition("-")
    if algo != "sha512":
        raise AssetError(f"unsupported integrity algorithm {algo!r}")
    actual = base64.b64encode(hashlib.sha512(data).digest()).decode()
    if actual != expected:
        raise AssetError(f"integrity mismatch: expected sha512-{expected}, got sha512-{actual}")


def extract(data: bytes, asset: Asset) -> bytes:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:gz") as tar:
        member = tar.getmember(asset.member)
        handle = tar.extractfile(member)
        if handle is None:
            raise AssetError(f"{asset.member} is not a file in {asset.tarball}")
        return handle.read()


def missing(cache_dir: Path) -> list[Asset]:
    return [a for a in ASSETS if not asset_path(cache_dir, a).is_file()]


def ensure(cache_dir: Path, *, fetch=None, log=print) -> list[Path]:
    """Fetch, verify and keep every asset not yet in the cache; the paths of all."""
    fetch = fetch or _download
    for asset in missing(cache_dir):
        log(f"fetching {asset.package}@{asset.version} from the npm registry")
        data = fetch(asset.tarball)
        check_integrity(data, asset.integrity)
        body = extract(data, asset)
        target = asset_path(cache_dir, asset)
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = target.with_suffix(target.suffix + f".{os.getpid()}.tmp")
        tmp.write_bytes(body)
        tmp.replace(target)
    return [asset_path(cache_dir, a) for a in ASSETS]


def _download(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=60) as resp:  # noqa: S310 (a fixed https URL)
        return resp.read()
