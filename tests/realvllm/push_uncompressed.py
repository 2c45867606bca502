"""Push a local image to the tests' registry with its layers uncompressed (test harness only).

    .venv/bin/python tests/realvllm/push_uncompressed.py IMAGE REGISTRY

`docker push` gzips every layer on one core; for the 3 GB real-vLLM image on a 2-core CI machine
that took 248 s, and every pull in the tests then gunzips it again. Here the layers go to the
registry as Docker's own uncompressed layer tars (media type
`application/vnd.docker.image.rootfs.diff.tar`), so each layer's digest is its diff id: measured
on the same machine, 105 s with a soak run beside it (41 s of it `docker save` preparing its
export), 58 s on the quiet machine. Docker detects each blob's compression as it registers a
layer, so such layers pull like any other, with the same per-layer byte progress (checked with
the harness's Docker 20.10: an image pushed this way, removed, pulled back, its files
byte-identical).

It speaks the registry API (distribution spec: a blob upload is POST, one streamed PATCH, then PUT
with the digest; then the schema 2 manifest), reading `docker save`'s stream once, without a copy
on disk. It exits non-zero with the reason on any error; scripts/realvllm_image.sh then falls back
to `docker push`.
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import tarfile
import time
from collections.abc import Iterator
from typing import IO

import docker
import httpx

MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
CONFIG = "application/vnd.docker.container.image.v1+json"
LAYER = "application/vnd.docker.image.rootfs.diff.tar"
CHUNK = 1 << 20


class ChunkReader(io.RawIOBase):
    """A file over an iterator of byte chunks (docker-py's `save()` stream), for tarfile."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks, self._buffer = chunks, b""

    def readable(self) -> bool:
        return True

    def readinto(self, target: bytearray | memoryview) -> int:  # type: ignore[override]
        while not self._buffer:
            try:
                self._buffer = next(self._chunks)
            except StopIteration:
                return 0
        n = min(len(target), len(self._buffer))
        target[:n] = self._buffer[:n]
        self._buffer = self._buffer[n:]
        return n


def with_digest(location: str, digest: str) -> str:
    # The upload URL carries the registry's own state in its query; httpx's params= would drop it.
    return f"{location}{'&' if '?' in location else '?'}digest={digest}"


def upload(http: httpx.Client, repo: str, source: IO[bytes], size: int) -> str:
    """One blob, streamed from `source`; returns its sha256 digest."""
    sha = hashlib.sha256()
    location = http.post(f"/v2/{repo}/blobs/uploads/").raise_for_status().headers["Location"]

    def body() -> Iterator[bytes]:
        left = size
        while left:
            chunk = source.read(min(left, CHUNK))
            if not chunk:
                raise OSError(f"the image stream ended {left} bytes early")
            sha.update(chunk)
            left -= len(chunk)
            yield chunk

    headers = {"Content-Type": "application/octet-stream"}
    sent = http.patch(location, content=body(), headers=headers).raise_for_status()
    digest = f"sha256:{sha.hexdigest()}"
    http.put(with_digest(sent.headers["Location"], digest)).raise_for_status()
    return digest


def upload_bytes(http: httpx.Client, repo: str, data: bytes) -> str:
    digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
    if http.head(f"/v2/{repo}/blobs/{digest}").status_code != 200:
        location = http.post(f"/v2/{repo}/blobs/uploads/").raise_for_status().headers["Location"]
        http.put(with_digest(location, digest), content=data).raise_for_status()
    return digest


def push(image_ref: str, registry: str) -> str:
    """Push `image_ref` (named `<host:port>/<repo>:<tag>`) to `registry` (host:port)."""
    name, tag = image_ref.rsplit(":", 1)
    repo = name.split("/", 1)[1]
    image = docker.from_env(timeout=1800).images.get(image_ref)
    layers: dict[str, tuple[str, int]] = {}  # layer path in the save stream -> (digest, size)
    small: dict[str, bytes] = {}  # manifest.json and the config
    with httpx.Client(base_url=f"http://{registry}", timeout=600) as http:
        chunks = iter(image.save(chunk_size=CHUNK, named=False))
        stream = io.BufferedReader(ChunkReader(chunks), CHUNK)
        with tarfile.open(fileobj=stream, mode="r|") as tar:
            for member in tar:
                data = tar.extractfile(member) if member.isfile() else None
                if data is None:
                    continue
                if member.name.endswith("/layer.tar"):
                    layers[member.name] = (upload(http, repo, data, member.size), member.size)
                elif "/" not in member.name and member.name.endswith(".json"):
                    small[member.name] = data.read()
        saved = json.loads(small["manifest.json"])[0]
        config = small[saved["Config"]]
        order = [layers[path] for path in saved["Layers"]]
        diff_ids = json.loads(config)["rootfs"]["diff_ids"]
        if [digest for digest, _ in order] != diff_ids:
            raise SystemExit(f"layer digests {order} are not the image's diff ids {diff_ids}")
        manifest = {
            "schemaVersion": 2,
            "mediaType": MANIFEST,
            "config": {
                "mediaType": CONFIG,
                "size": len(config),
                "digest": upload_bytes(http, repo, config),
            },
            "layers": [{"mediaType": LAYER, "size": s, "digest": d} for d, s in order],
        }
        done = http.put(
            f"/v2/{repo}/manifests/{tag}",
            content=json.dumps(manifest).encode(),
            headers={"Content-Type": MANIFEST},
        ).raise_for_status()
    return str(done.headers.get("Docker-Content-Digest", ""))


def main() -> None:
    if len(sys.argv) != 3:
        raise SystemExit("usage: push_uncompressed.py IMAGE REGISTRY")
    began = time.monotonic()
    try:
        digest = push(sys.argv[1], sys.argv[2])
    except (OSError, KeyError, ValueError, httpx.HTTPError, docker.errors.DockerException) as err:
        raise SystemExit(f"pushing {sys.argv[1]} uncompressed failed: {err!r}") from err
    print(f"pushed {sys.argv[1]} uncompressed in {time.monotonic() - began:.0f} s: {digest}")


if __name__ == "__main__":
    main()
