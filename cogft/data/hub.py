"""`data.path: hf://datasets/OWNER/NAME[@REVISION][/SUBFOLDER]`: a Hugging Face dataset repo, read like a local folder.

The repo is fetched once through huggingface_hub into its own cache (`HF_HUB_CACHE`), where every later run
(and `HF_HUB_OFFLINE=1`) finds it; clips are then read from that snapshot exactly as from a local folder or
metadata file, so the content-hashed latent cache, the report and doctor work unchanged.

A dataset repo is written by strangers: every path it names (`data.path`'s subfolder, a list's entries, a symbolic
link in it) must stay inside its snapshot, or a `metadata.csv` could have cogft read, train on and push files of the
machine it runs on (`escapes`).
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from .errors import DatasetLayoutError

logger = logging.getLogger(__name__)

HUB_PREFIX = "hf://"
_DATASET = re.compile(r"^hf://datasets/(?P<repo>[\w.-]+/[\w.-]+)(?:@(?P<revision>[^/]+))?(?:/(?P<sub>.*))?$")


def is_hub_path(path: str | Path) -> bool:
    return str(path).startswith(HUB_PREFIX)


def escapes(path: Path, snapshot: Path) -> str | None:
    """Why `path` is not inside the dataset `snapshot` (None where it is): written outside it (an absolute path,
    `..`), or a symbolic link out of it. The Hub's own cache keeps each file as a link into the repo's `blobs`
    folder, so links that stay within the repo's storage are followed."""
    if not _within(os.path.normpath(path), os.path.normpath(snapshot)):
        return f"{path} is outside the dataset {snapshot}"
    real, storage = os.path.realpath(path), os.path.realpath(snapshot)
    allowed = [storage]
    if Path(snapshot).parent.name == "snapshots":  # huggingface_hub's layout: REPO/snapshots/COMMIT -> REPO/blobs
        allowed.append(os.path.join(os.path.dirname(os.path.dirname(storage)), "blobs"))
    if not any(_within(real, folder) for folder in allowed):
        return f"{path} is a symbolic link (or under one) to {real}, outside the dataset {snapshot}"
    return None


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


def dataset_folder(path: str) -> tuple[Path, Path]:
    """The local folder (or file) a `hf://datasets/...` data.path stands for, fetched on first use, and the
    snapshot that holds it (which every path the dataset names must stay inside)."""
    match = _DATASET.match(path)
    if match is None:
        raise DatasetLayoutError(f"data.path {path}: write hf://datasets/OWNER/NAME, optionally with @REVISION and "
                                 "/SUBFOLDER (e.g. hf://datasets/me/my-clips@main/train); "
                                 "only dataset repos hold clips")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    repo, revision, sub = match["repo"], match["revision"], (match["sub"] or "").strip("/")
    try:
        folder = Path(snapshot_download(repo, repo_type="dataset", revision=revision))
    except LocalEntryNotFoundError:
        raise DatasetLayoutError(
            f"data.path {path}: dataset {repo}{'@' + revision if revision else ''} "
            "is not in the Hugging Face cache and "
            "the Hub cannot be reached (HF_HUB_OFFLINE=1, or no network); fetch it once where there is network "
            f"(`huggingface-cli download --repo-type dataset {repo}`) or unset HF_HUB_OFFLINE") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as error:
        raise DatasetLayoutError(f"data.path {path}: {type(error).__name__}: the dataset repo {repo} or its revision "
                                 "does not exist, or it is private or gated: check the name and log in with "
                                 "`huggingface-cli login`") from None
    except HfHubHTTPError as error:
        raise DatasetLayoutError(
            f"data.path {path}: the Hub refused the download ({str(error).splitlines()[0]})") from None
    logger.info("data.path %s: reading the dataset snapshot in %s", path, folder)
    target = folder / sub if sub else folder
    if outside := escapes(target, folder):
        raise DatasetLayoutError(f"data.path {path}: {outside}; name a subfolder or file of the dataset")
    if not target.exists():
        raise DatasetLayoutError(f"data.path {path}: the dataset {repo} has no {sub!r}; it holds "
                                 f"{', '.join(sorted(p.name for p in folder.iterdir())) or 'nothing'}")
    return target, folder
