"""Lets OpenAI's `tiktoken` run without the internet.

At first use tiktoken downloads an encoding's BPE file from OpenAI's blob storage and keeps
it in TIKTOKEN_CACHE_DIR under the SHA-1 hex of the file's URL, after checking its SHA-256
against the hash pinned in `tiktoken_ext/openai_public.py` (see `read_file_cached` in
`tiktoken/load.py`). The Rust crate tiktoken-rs embeds the very same files, so seeding the
cache with its copies makes `tiktoken.get_encoding` work offline, unchanged.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

# The URLs and SHA-256 hashes of tiktoken_ext/openai_public.py.
BLOB_URL = "https://openaipublic.blob.core.windows.net/encodings/{name}.tiktoken"
EXPECTED_SHA256 = {
    "o200k_base": "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d",
    "cl100k_base": "223921b76ee99bde995b7ff738513eef100fb51d18c93597a113bcffe865b2a7",
}


def seed_cache(assets_dir: Path, cache_dir: Path) -> None:
    """Copies tiktoken-rs's BPE files into tiktoken's cache, under tiktoken's cache keys."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    for name, expected in EXPECTED_SHA256.items():
        source = assets_dir / f"{name}.tiktoken"
        data = source.read_bytes()
        actual = hashlib.sha256(data).hexdigest()
        if actual != expected:
            raise SystemExit(f"{source} has SHA-256 {actual}, but tiktoken expects {expected} for {name}")
        target = cache_dir / hashlib.sha1(BLOB_URL.format(name=name).encode()).hexdigest()
        if target.exists() and hashlib.sha256(target.read_bytes()).hexdigest() == expected:
            continue
        partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
        partial.write_bytes(data)
        partial.replace(target)


def forbid_downloads() -> None:
    """Makes a download attempt fail loudly instead of hanging on a network that isn't there."""
    import tiktoken.load

    def read_file(blobpath: str) -> bytes:
        raise RuntimeError(
            f"tiktoken tried to download {blobpath}: its cache in {os.environ.get('TIKTOKEN_CACHE_DIR')} "
            "was not seeded under the key it looked for (see tiktoken/load.py)"
        )

    tiktoken.load.read_file = read_file


def use_bundled_encodings() -> None:
    """Seeds the cache named by TIKTOKEN_CACHE_DIR from the directory TOLLGATE_TIKTOKEN_ASSETS
    (tiktoken-rs's `assets/`), then forbids downloads."""
    try:
        assets = Path(os.environ["TOLLGATE_TIKTOKEN_ASSETS"])
        cache = Path(os.environ["TIKTOKEN_CACHE_DIR"])
    except KeyError as missing:
        raise SystemExit(f"{missing} must be set (tests/integration/python.rs sets both)") from None
    seed_cache(assets, cache)
    forbid_downloads()
