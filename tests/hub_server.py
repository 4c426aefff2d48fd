"""A local stand-in for the part of the Hugging Face Hub API that ``huggingface_hub`` uses to create a
repo, create a branch, upload a folder (README metadata check, preupload + ndjson commit, every file "regular") and download files
(HEAD/GET ``/{repo}/resolve/{revision}/{path}``). Routes and headers follow huggingface_hub's
``hf_api.py`` (create_repo, create_branch), ``_commit_api.py`` (_fetch_upload_modes, _send_commit) and
``file_download.py`` (get_hf_file_metadata: X-Repo-Commit, ETag, Content-Length).

``fail`` injects errors: a list of ``(route name, status)`` consumed in order when that route is hit.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit


class HubState:
    def __init__(self, token: str):
        self.token = token
        self.repos: dict[str, dict] = {}   # repo_id -> {"private": bool, "branches": {name: {"sha": str, "files": {path: bytes}}}}
        self.calls: list[tuple[str, str]] = []   # (route name, status)
        self.fail: list[tuple[str, int]] = []
        self.lock = threading.Lock()


ROUTES = [
    ("POST", "create", re.compile(r"^/api/repos/create$")),
    ("POST", "validate_yaml", re.compile(r"^/api/validate-yaml$")),
    ("POST", "branch", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/branch/(?P<rev>[^/]+)$")),
    ("POST", "preupload", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/preupload/(?P<rev>[^/]+)$")),
    ("POST", "commit", re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/commit/(?P<rev>[^/]+)$")),
    ("HEAD", "resolve", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
    ("GET", "resolve", re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")),
]


def make_handler(state: HubState):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, json_body=None):
            if json_body is not None:
                body = json.dumps(json_body).encode()
                headers = {"Content-Type": "application/json", **(headers or {})}
            self.send_response(status)
            for k, v in (headers or {}).items():
                self.send_header(k, v)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _body(self) -> bytes:
            n = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(n) if n else b""

        def _dispatch(self):
            path = unquote(urlsplit(self.path).path)
            for method, name, rx in ROUTES:
                m = rx.match(path)
                if method == self.command and m:
                    body = self._body()
                    with state.lock:
                        if self.headers.get("Authorization") != f"Bearer {state.token}":
                            state.calls.append((name, 401))
                            return self._send(401, json_body={"error": "Invalid credentials in Authorization header"})
                        if state.fail and state.fail[0][0] == name:
                            status = state.fail.pop(0)[1]
                            state.calls.append((name, status))
                            return self._send(status, json_body={"error": "injected failure"})
                        state.calls.append((name, 200))
                        return getattr(self, f"_{name}")(body, **m.groupdict())
            with state.lock:
                state.calls.append((f"{self.command} {path}", 404))
            self._send(404, json_body={"error": f"no route {self.command} {path}"})

        do_GET = do_POST = do_HEAD = _dispatch

        def _create(self, body):
            req = json.loads(body)
            repo = f"{req['organization']}/{req['name']}"
            if repo in state.repos:
                return self._send(409, json_body={"error": "You already created this model repo", "url": repo})
            state.repos[repo] = {"private": req.get("visibility", "public") == "private" or bool(req.get("private")),
                                 "branches": {"main": {"sha": "0" * 40, "files": {}}}}
            self._send(200, json_body={"url": f"http://{self.headers['Host']}/{repo}", "name": repo})

        def _validate_yaml(self, body):
            """README.md check: upload_folder sends the model card; its front matter must be a YAML mapping."""
            import yaml

            front = re.match(r"^---\n(.*?)\n---\n", json.loads(body)["content"], re.DOTALL)
            try:
                ok = front is not None and isinstance(yaml.safe_load(front.group(1)), dict)
            except yaml.YAMLError:
                ok = False
            if not ok:
                return self._send(400, json_body={"errors": [{"message": "metadata is not a YAML mapping"}]})
            self._send(200, json_body={"errors": [], "warnings": []})

        def _branch(self, body, repo, rev):
            branches = state.repos[repo]["branches"]
            if rev in branches:
                return self._send(409, json_body={"error": "branch exists"})
            branches[rev] = {"sha": branches["main"]["sha"], "files": dict(branches["main"]["files"])}
            self._send(200, json_body={})

        def _preupload(self, body, repo, rev):
            files = json.loads(body)["files"]
            self._send(200, json_body={"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                                                  "oid": None} for f in files]})

        def _commit(self, body, repo, rev):
            branch = state.repos[repo]["branches"][rev]
            digest = hashlib.sha1(body)
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    branch["files"][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._send(400, json_body={"error": f"unsupported commit item {item['key']}"})
            digest.update(branch["sha"].encode())
            branch["sha"] = digest.hexdigest()
            self._send(200, json_body={"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{branch['sha']}",
                                       "commitOid": branch["sha"], "success": True})

        def _resolve(self, body, repo, rev, path):
            branch = state.repos.get(repo, {}).get("branches", {}).get(rev)
            if branch is None or path not in branch["files"]:
                return self._send(404, headers={"X-Error-Code": "EntryNotFound"}, json_body={"error": "not found"})
            data = branch["files"][path]
            etag = hashlib.sha1(data).hexdigest()
            self._send(200, data, {"X-Repo-Commit": branch["sha"], "ETag": f'"{etag}"',
                                   "Content-Type": "application/octet-stream"})

    return Handler


class LocalHub:
    """``with LocalHub(token) as hub: hub.url ...``"""

    def __init__(self, token: str):
        self.state = HubState(token)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(self.state))
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.server.shutdown()
        self.server.server_close()
