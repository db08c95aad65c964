"""A registry entry's published weights (``weights: imagenet`` or ``pretrained``): where they come from, where this
machine keeps them, how they are fetched for an offline node.

Three places are looked at, in order: a file registered with ``aml-rapids weights fetch NAME --file F`` (in
aml-rapids' own cache, with the sha256 it had when registered), torch's hub cache (``TORCH_HOME``) for a file on
the web, and the Hugging Face cache (``HF_HOME``) for a hub repository, the caches torchvision and timm fill
themselves. ``fetch`` downloads (``aml-rapids weights fetch``); other commands download only a torchvision
file they miss, which fails at once offline, never a hub repository (the hub's client retries for about half a
minute); an offline error names each place that was looked at.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from urllib.error import URLError
from urllib.parse import urlparse

import torch

from ..errors import DownloadError, WeightsError
from ..outputs import atomic_write_text, cache_home, file_sha256, slug
from .backbones import BackboneSpec, Published

REGISTRATION = "registered.json"


@dataclass(frozen=True)
class Found:
    """A published weights file on this machine, and which of the three places it is in."""

    path: Path
    place: str  # "registered", "torch cache" or "hugging face cache"
    sha256: str | None = None  # a registered file's sha256 when it was registered: what loading it must find


def verify(found: Found, digest: str, name: str) -> None:
    """A registered file whose sha256 (``digest``, computed by the loader anyway) is not the registered one is
    refused: a copy cut short or overwritten."""
    if found.sha256 is not None and digest != found.sha256:
        raise WeightsError(f"the weights registered for {name} at {found.path} are damaged (their sha256 is not the "
                           f"registered {found.sha256[:12]}...): register the file again with "
                           f"`aml-rapids weights fetch {name} --file FILE`")


def torch_cache() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints"


def hf_cache() -> Path:
    """The Hugging Face hub cache, read from the environment at each call (huggingface_hub reads it at import)."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    return Path(home) / "hub"


def registered_dir(name: str) -> Path:
    return cache_home() / "weights" / slug(name)


def url_file(url: str) -> str:
    """The name a download of ``url`` is cached under (its last path part, the query dropped)."""
    return Path(urlparse(url).path).name


def hf_cached(repo: str, filename: str, cache_dir: Path | None = None) -> Path | None:
    """A file of a hub repository in the Hugging Face cache, offline (no request is made)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo, filename, cache_dir=str(cache_dir or hf_cache()))
    return Path(found) if isinstance(found, str) else None


def registered(name: str) -> Found | None:
    """The file registered for ``name``, with the sha256 it was registered with (``verify`` checks it where the
    file is read: hashing it here too would read a large file twice)."""
    folder = registered_dir(name)
    try:
        record = json.loads((folder / REGISTRATION).read_text())
    except (OSError, ValueError):
        return None
    path = folder / record["file"]
    if not path.is_file():
        raise WeightsError(f"the weights registered for {name} at {path} are missing: register the file again with "
                           f"`aml-rapids weights fetch {name} --file FILE`")
    return Found(path, "registered", record["sha256"])


def find(spec: BackboneSpec) -> Found | None:
    """Where this machine holds ``spec``'s published weights, looking at the three places in order."""
    pub = spec.published
    if pub is None:
        return None
    own = registered(spec.name)
    if own is not None:
        return own
    if pub.url and (torch_cache() / url_file(pub.url)).is_file():
        return Found(torch_cache() / url_file(pub.url), "torch cache")
    for filename in pub.hf_files if pub.hf_repo else ():
        cached = hf_cached(pub.hf_repo, filename)
        if cached is not None:
            return Found(cached, "hugging face cache")
    return None


def places(spec: BackboneSpec) -> str:
    """The places ``find`` looks at, in words, for an error message."""
    pub = spec.published
    where = [str(registered_dir(spec.name) / REGISTRATION)]
    if pub.url:
        where.append(str(torch_cache() / url_file(pub.url)))
    if pub.hf_repo:
        where.append(f"{hf_cache()} (hub repository {pub.hf_repo}: {' or '.join(pub.hf_files)})")
    return "; ".join(where)


def fetch(name: str, pub: Published, to: Path | None = None, config: bool = False) -> Found:
    """Download ``name``'s published weights ``pub`` into the caches the loaders read, or into ``to`` laid out as
    those caches (``to/torch`` for TORCH_HOME, ``to/huggingface`` for HF_HOME) to copy to an offline node;
    ``config``: the hub repository's config.json too (a ``timm:hf-hub:`` model is built from it)."""
    if pub.url:
        folder = to / "torch" / "hub" / "checkpoints" if to else torch_cache()
        target = folder / url_file(pub.url)
        if not target.is_file():
            folder.mkdir(parents=True, exist_ok=True)
            prefix = torch.hub.HASH_REGEX.search(target.name) if pub.hash_in_name else None
            _download(name, pub.url, lambda: torch.hub.download_url_to_file(
                pub.url, str(target), prefix.group(1) if prefix else None, progress=True))
        return Found(target, "torch cache")
    cache_dir = to / "huggingface" / "hub" if to else hf_cache()
    if config and _download(name, f"hf-hub:{pub.hf_repo}/config.json",
                            lambda: _hf_download(pub.hf_repo, "config.json", cache_dir)) is None:
        raise DownloadError(f"hub repository {pub.hf_repo} has no config.json, so {name} cannot be built from it")
    for filename in pub.hf_files:
        path = _download(name, f"hf-hub:{pub.hf_repo}/{filename}",
                         lambda: _hf_download(pub.hf_repo, filename, cache_dir))
        if path is not None:
            return Found(Path(path), "hugging face cache")
    raise DownloadError(f"hub repository {pub.hf_repo} holds none of {', '.join(pub.hf_files)} for {name}")


def _hf_download(repo: str, filename: str, cache_dir: Path) -> str | None:
    """A hub file, downloaded into ``cache_dir``; None if the repository has no such file."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import RemoteEntryNotFoundError

    try:
        return hf_hub_download(repo, filename, cache_dir=str(cache_dir))
    except RemoteEntryNotFoundError:
        return None


def _download(name: str, what: str, download: Callable[[], object]):
    try:
        return download()
    except (URLError, OSError, RuntimeError, ValueError) as exc:
        raise DownloadError(f"could not download {what} for {name} ({type(exc).__name__}: {exc})") from None
    except Exception as exc:  # huggingface_hub's own errors (offline mode, repository not found, ...)
        if type(exc).__module__.startswith("huggingface_hub"):
            raise DownloadError(f"could not download {what} for {name} ({type(exc).__name__}: {exc})") from None
        raise


def register(spec: BackboneSpec, file: Path, check: Callable[[Path], None]) -> Found:
    """Copy a local weights file into aml-rapids' cache as ``spec``'s published weights, once ``check`` (load it
    into the network) accepts it; its sha256 is recorded and verified at every later load."""
    file = Path(file)
    if not file.is_file():
        raise WeightsError(f"weights file {file} for {spec.name} does not exist")
    check(file)
    folder = registered_dir(spec.name)
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, prefix=f".{file.name}.", delete=False) as scratch:
        shutil.copyfileobj(file.open("rb"), scratch)
    os.chmod(scratch.name, 0o644)  # a shared cache: readable by the other users of the node, as the copied file is
    os.replace(scratch.name, folder / file.name)
    for other in folder.iterdir():  # an earlier registration's file
        if other.name not in (file.name, REGISTRATION) and not other.name.startswith("."):
            other.unlink()
    atomic_write_text(folder / REGISTRATION, json.dumps({
        "backbone": spec.name, "file": file.name, "sha256": file_sha256(folder / file.name),
        "registered_from": str(file.resolve()), "registered_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")}, indent=1))
    return Found(folder / file.name, "registered")


WEIGHT_FILES = (".safetensors", ".bin", ".pth", ".pt")


def hub_backbone(repo: str) -> str:
    """The registry name of a hub repository: timm's own as ``timm:NAME.TAG``, any other as ``timm:hf-hub:...``."""
    return f"timm:{repo.removeprefix('timm/')}" if repo.startswith("timm/") else f"timm:hf-hub:{repo}"


def cached(checksums: bool = True) -> list[dict]:
    """Every weights file on this machine in the three places, with the backbone it is for (where known), its
    size and (``checksums``) sha256."""
    from .backbones import REGISTRY
    from .timm_backbones import PRESETS

    by_file = {url_file(p.url): n for n, p in [*((s.name, s.published) for s in REGISTRY.values()),
                                               *((n, p.published) for n, p in PRESETS.items())] if p and p.url}
    found, registered_sha = [], {}
    for record in sorted((cache_home() / "weights").glob(f"*/{REGISTRATION}")):
        about = json.loads(record.read_text())
        found.append((about["backbone"], "registered", record.parent / about["file"]))
        registered_sha[record.parent / about["file"]] = about["sha256"]
    if torch_cache().is_dir():
        found += [(by_file.get(p.name), "torch cache", p) for p in sorted(torch_cache().iterdir()) if p.is_file()]
    if hf_cache().is_dir():
        from huggingface_hub import scan_cache_dir

        for repo in sorted(scan_cache_dir(hf_cache()).repos, key=lambda r: r.repo_id):
            found += [(hub_backbone(repo.repo_id), "hugging face cache", f.file_path)
                      for revision in repo.revisions for f in revision.files
                      if repo.repo_type == "model" and f.file_name.endswith(WEIGHT_FILES)]
    rows = []
    for name, place, path in found:
        if not path.is_file():
            rows.append({"backbone": name, "place": place, "path": str(path), "bytes": None, "sha256": None,
                         "intact": False})
            continue
        digest = file_sha256(path) if checksums else None
        rows.append({"backbone": name, "place": place, "path": str(path), "bytes": path.stat().st_size,
                     "sha256": digest, "intact": registered_sha[path] == digest
                     if checksums and path in registered_sha else None})
    return rows
