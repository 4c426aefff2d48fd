"""Push an output folder to the Hugging Face Hub (``create_repo`` + ``upload_folder``).

The token comes from the usual places (``HF_TOKEN``, ``hf auth login``) through ``huggingface_hub``; it
is never printed or logged. Local paths (the user's folders, home directory) are redacted from the text files
that are uploaded. Transient failures (HTTP 5xx, 429, connection errors, timeouts) are retried
with exponential backoff; 401/403 raise ``HubAuthError`` with a one-line message.
"""

from __future__ import annotations

import logging
import re
import time
from pathlib import Path

from huggingface_hub import CommitOperationAdd, constants, HfApi
from huggingface_hub.errors import HfHubHTTPError

from hfquant.app.report import CARD, RECIPE, REPORT, SENSITIVITY_JSON, SENSITIVITY_MD
from hfquant.core.errors import HFQuantError

logger = logging.getLogger(__name__)


class HubError(HFQuantError):
    """The Hub refused or failed a request (after retries)."""


class HubAuthError(HubError):
    """The Hub answered 401/403: missing, invalid or read-only token, or no access to the repo."""


def _status(exc) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


_NETWORK_ERRORS = {"TransportError", "NetworkError", "TimeoutException", "ConnectError", "RemoteProtocolError"}


def _transient(exc) -> bool:
    status = _status(exc)
    if status is not None:
        return status == 429 or status >= 500
    # huggingface_hub's HTTP client (httpx or its fork httpx2) raises TransportError subclasses.
    names = {cls.__name__ for cls in type(exc).__mro__}
    return bool(names & _NETWORK_ERRORS) or isinstance(exc, (ConnectionError, TimeoutError))


def _call(what: str, repo_id: str, fn, attempts: int, wait: float):
    """``fn()`` with retries on transient errors; Hub errors become one-line ``HubError``s."""
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except Exception as exc:  # classified below, re-raised as HubError
            status = _status(exc)
            if status in (401, 403):
                raise HubAuthError(
                    f"hub: {what} {repo_id!r} was refused (HTTP {status}): the token is missing, invalid, read-only "
                    "or has no access to this repo; log in with `hf auth login` or set HF_TOKEN to a write token"
                ) from None
            if not _transient(exc) or attempt == attempts:
                if not isinstance(exc, (HfHubHTTPError, OSError)) and not _transient(exc):
                    raise
                detail = f"HTTP {status}" if status is not None else type(exc).__name__
                tries = f" after {attempt} attempts" if attempt > 1 else ""
                raise HubError(f"hub: {what} {repo_id!r} failed{tries} ({detail}); check the repo id and "
                               "your connection, then retry with `hfquant push`") from None
            delay = wait * 2 ** (attempt - 1)
            logger.warning("hub: %s failed (%s); retrying in %.1f s (%d/%d)", what,
                           f"HTTP {status}" if status is not None else type(exc).__name__, delay, attempt, attempts - 1)
            time.sleep(delay)
    raise AssertionError("unreachable")


# Text files of an output folder that can name local paths (the recipe's model, data and output folders).
TEXT_FILES = (CARD, RECIPE, REPORT, SENSITIVITY_JSON, SENSITIVITY_MD)


def redact(text: str, replacements: dict[str, str]) -> str:
    """``text`` with each local path of ``replacements`` (longest first; only where the path ends, not inside a
    longer name) replaced by its stand-in, and the home directory by ``~``."""
    pairs = sorted(replacements.items(), key=lambda kv: -len(kv[0]))
    home = str(Path.home())
    if len(home) > 1:
        pairs.append((home, "~"))
    for path, stand_in in pairs:
        text = re.sub(re.escape(path) + r"(?![\w.-])", lambda _m, s=stand_in: s, text)
    return text


def push_folder(folder, repo_id: str, *, private: bool = True, revision: str | None = None,
                commit_message: str | None = None, attempts: int = 4, wait: float = 1.0,
                replacements: dict[str, str] | None = None) -> str:
    """Create ``repo_id`` if needed and upload ``folder``'s files to it (branch ``revision``) in one commit. The text
    files that can name local paths (``TEXT_FILES``) are uploaded with ``replacements`` (local path -> stand-in, e.g.
    the folder's name) and the home directory redacted (``redact``); the local files are not changed. Returns the
    commit URL."""
    if constants.HF_HUB_OFFLINE:
        raise HubError("hub: HF_HUB_OFFLINE is set, so nothing can be pushed; unset it (e.g. HF_HUB_OFFLINE=0) and retry")
    folder = Path(folder)
    operations = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if name in TEXT_FILES:
            text = redact(path.read_text(encoding="utf-8"), replacements or {})
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=text.encode("utf-8")))
        else:
            operations.append(CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path)))
    api = HfApi()
    _call("creating repo", repo_id, lambda: api.create_repo(repo_id, private=private, exist_ok=True), attempts, wait)
    if revision:
        _call("creating branch", repo_id,
              lambda: api.create_branch(repo_id, branch=revision, exist_ok=True), attempts, wait)
    message = commit_message or f"Upload {folder.name} (quantized with hfquant)"
    info = _call("uploading to", repo_id, lambda: api.create_commit(
        repo_id, operations, commit_message=message, revision=revision), attempts, wait)
    return str(getattr(info, "commit_url", info))
