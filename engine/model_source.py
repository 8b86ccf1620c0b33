"""Where a model comes from: one resolver from a model argument to a local folder.

``parse_model_uri`` is pure: it classifies the argument (an existing local path, ``hf://ORG/NAME[:GGUF][@REV]`` or a
bare ``ORG/NAME[:GGUF][@REV]``, ``s3://BUCKET/PREFIX``). ``:GGUF`` picks one GGUF file of a repo that ships many: a
quantization (``:Q4_K_M``) or a file name (``:model-Q4_K_M.gguf``). ``fetch`` makes the weights local: through ``huggingface_hub`` for the
hub (its cache layout, file locks and ``HF_*`` settings, so several processes can share one cache and
``HF_HUB_OFFLINE=1`` reads only what is there) and ``boto3`` for S3. ``flotilla serve`` and ``flotilla download``
both come through here, and loading starts only once this has finished or failed with a ``ModelSourceError`` whose
message says what to do.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import shutil
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path

logger = logging.getLogger(__name__)

# What serving needs from a repo: configs, tokenizer files, chat templates and safetensors (with their index).
# Never PyTorch pickles, the original/ checkpoints Meta ships beside the HF ones, or consolidated.* files.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "tokenizer.model", "*.tiktoken", "*.txt", "*.jinja"]
IGNORE_PATTERNS = ["original/*", "consolidated*", "*.bin", "*.pt", "*.pth", "*.msgpack", "*.h5", "*.onnx"]

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
# ORG/NAME, then an optional :GGUF selector and an optional @REVISION (git refs cannot contain ':')
_HF_ARG = re.compile(r"^(?P<repo>[^:@]+)(?::(?P<gguf>[^:@/]+))?(?:@(?P<revision>.+))?$")


class ModelSourceError(Exception):
    """A model could not be made local; the message is one line that says what to do."""


@dataclass(frozen=True)
class ModelRef:
    kind: str  # "local" | "hf" | "s3"
    location: str  # a path, a repo id, or s3://bucket/prefix
    revision: str | None = None
    gguf: str | None = None  # in a hub repo: a GGUF file name, or a quantization its file name ends with

    def __str__(self) -> str:
        return self.location + (f":{self.gguf}" if self.gguf else "") + (f"@{self.revision}" if self.revision else "")

    def gguf_patterns(self) -> list[str]:
        """File patterns that select this ref's GGUF file (as the hub client's allow_patterns)."""
        if self.gguf is None:
            return []
        if self.gguf.endswith(".gguf"):
            return [self.gguf]
        return sorted({f"*{q}.gguf" for q in (self.gguf, self.gguf.upper(), self.gguf.lower())})


def parse_model_uri(model: str, revision: str | None = None) -> ModelRef:
    """Classify a model argument. An existing local path always wins over a repo id of the same spelling."""
    if model.startswith("s3://"):
        if not re.match(r"^s3://[^/]+(/.*)?$", model):
            raise ModelSourceError(f"model: {model!r} is not s3://BUCKET/PREFIX")
        return ModelRef("s3", model.rstrip("/"))
    if Path(model).expanduser().exists() and not model.startswith("hf://"):
        return ModelRef("local", str(Path(model).expanduser()))
    parts = _HF_ARG.match(model.removeprefix("hf://"))
    if parts is None or not _REPO_ID.match(parts["repo"]):
        raise ModelSourceError(f"model: {model!r} is neither a local path, a Hugging Face repo id "
                               "(ORG/NAME[:GGUF][@REV]) nor s3://BUCKET/PREFIX")
    pinned = parts["revision"]
    if pinned is not None:
        if revision is not None and revision != pinned:
            raise ModelSourceError(f"model: {model!r} pins revision {pinned!r} but --revision is {revision!r}")
        revision = pinned
    return ModelRef("hf", parts["repo"], revision, parts["gguf"])


def fetch(ref: ModelRef, download_dir: str | None = None, token: str | None = None, weights: bool = True) -> Path:
    """A local folder holding the model named by ``ref`` (downloaded when needed), or for a GGUF ref its one
    ``.gguf`` file. ``weights=False`` fetches configs and tokenizer only (``load_format="dummy"``)."""
    if ref.kind == "local":
        return Path(ref.location)
    if ref.gguf is not None:
        return _one_gguf(ref, _fetch_hf(ref, download_dir, token, ref.gguf_patterns()))
    allow = ALLOW_PATTERNS if weights else [p for p in ALLOW_PATTERNS if p != "*.safetensors"]
    try:
        if ref.kind == "hf":
            folder = _fetch_hf(ref, download_dir, token, allow)
        else:
            folder = _fetch_s3(ref, download_dir, allow)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise ModelSourceError(f"model: the disk under {download_dir or 'the cache'} is full while downloading "
                                   f"{ref}; free space or point --download-dir at a larger volume") from e
        raise
    if weights and not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"model: {ref} has no *.safetensors files (Flotilla does not load PyTorch .bin "
                               "pickles); use a repo or revision that ships safetensors")
    return folder


def _one_gguf(ref: ModelRef, folder: Path) -> Path:
    files = sorted(p for pattern in ref.gguf_patterns() for p in folder.glob(pattern))
    if not files:
        raise ModelSourceError(f"model: {ref.location} has no GGUF file matching {ref.gguf!r}; name one of its "
                               ".gguf files or the quantization it ends with (ORG/NAME:Q4_K_M)")
    if len(files) > 1:
        names = ", ".join(p.name for p in files)
        raise ModelSourceError(f"model: {ref.gguf!r} matches several GGUF files in {ref.location} ({names}); name "
                               "one file (ORG/NAME:FILE.gguf); split GGUF files must be merged first (llama-gguf-split)")
    return files[0]


def _fetch_hf(ref: ModelRef, download_dir: str | None, token: str | None, allow: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    try:
        # token=None lets the hub client read HF_TOKEN (or a stored login) itself.
        path = snapshot_download(ref.location, revision=ref.revision, cache_dir=download_dir,
                                 token=token, allow_patterns=allow, ignore_patterns=IGNORE_PATTERNS)
    except GatedRepoError as e:
        raise ModelSourceError(f"model: {ref.location} is gated on {where}: accept its licence there and set HF_TOKEN "
                               "(or --hf-token) to a token of an account that has access") from e
    except RevisionNotFoundError as e:
        raise ModelSourceError(f"model: revision {ref.revision!r} of {ref.location} does not exist; use a branch, "
                               "tag or commit of that repo (--revision)") from e
    except RepositoryNotFoundError as e:
        has_token = token or os.environ.get("HF_TOKEN")
        hint = "check the name and the token" if has_token else "check the name, or set HF_TOKEN if it is private"
        raise ModelSourceError(f"model: repo {ref.location} was not found on {where} ({hint})") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        if _offline():
            raise ModelSourceError(f"model: {ref} is not in the cache and HF_HUB_OFFLINE is set; download it first "
                                   "(flotilla download) or unset HF_HUB_OFFLINE") from e
        raise ModelSourceError(f"model: cannot reach {where} to download {ref} and it is not cached; check the "
                               "network (or HF_ENDPOINT), or set HF_HUB_OFFLINE=1 to use the cache only") from e
    except HfHubHTTPError as e:
        raise ModelSourceError(f"model: downloading {ref} from {where} failed: {str(e).splitlines()[0]}") from e
    return Path(path)


def _fetch_s3(ref: ModelRef, download_dir: str | None, allow: list[str]) -> Path:
    import boto3
    from botocore.exceptions import BotoCoreError, ClientError, NoCredentialsError

    bucket, _, prefix = ref.location.removeprefix("s3://").partition("/")
    root = Path(download_dir) if download_dir else cache_root() / "s3"
    target = root / bucket / (prefix or "_")
    if (target / ".complete").exists():
        return target
    if _offline():
        raise ModelSourceError(f"model: {ref} is not in {root} and HF_HUB_OFFLINE is set; download it first")
    client = boto3.client("s3", endpoint_url=os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    tmp = target.with_name(f"{target.name}.tmp{os.getpid()}")
    listed = f"{prefix}/" if prefix else ""  # parse_model_uri has stripped any trailing slash
    try:
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=listed)
        rels = [obj["Key"][len(listed):] for page in pages for obj in page.get("Contents", [])]
        wanted = [(listed + rel, rel) for rel in rels
                  if rel and any(fnmatch(rel, p) for p in allow) and not any(fnmatch(rel, p) for p in IGNORE_PATTERNS)]
        if not wanted:
            raise ModelSourceError(f"model: nothing to serve under {ref} (no config or weights); check the prefix")
        for key, rel in wanted:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            logger.info("downloading s3://%s/%s", bucket, key)
            client.download_file(bucket, key, str(dest))
    except NoCredentialsError as e:
        raise ModelSourceError(f"model: no AWS credentials to read {ref}; set AWS_ACCESS_KEY_ID and "
                               "AWS_SECRET_ACCESS_KEY (or a role)") from e
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code", "")
        raise ModelSourceError(f"model: S3 refused {ref} ({code}): check the bucket, the prefix and the "
                               "credentials' permissions") from e
    except BotoCoreError as e:
        raise ModelSourceError(f"model: cannot reach S3 for {ref} ({e}); check AWS_ENDPOINT_URL and the network") from e
    (tmp / ".complete").write_text(ref.location)
    try:
        tmp.rename(target)
    except OSError:  # another process finished first: theirs is as good as ours
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def size_bytes(path: Path) -> int:
    """Bytes of a file, or of every file under a folder (hub snapshots are links into the blob store: followed)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def cache_root() -> Path:
    """Flotilla's own cache (GGUF conversions, S3 downloads); FLOTILLA_CACHE overrides it."""
    return Path(os.environ.get("FLOTILLA_CACHE", Path.home() / ".cache" / "flotilla"))


def prebuilt_cache_roots() -> list[Path]:
    """Read-only caches filled ahead of time (os.pathsep-separated FLOTILLA_CACHE_PREBUILT), looked in first."""
    return [Path(p) for p in os.environ.get("FLOTILLA_CACHE_PREBUILT", "").split(os.pathsep) if p]


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)  # the hub client's own reading of HF_HUB_OFFLINE
