"""An in-process fake Hugging Face Hub for the push tests (a helper module, not a test module).

`FakeHub` answers the repo-creation, YAML-validation, preupload and commit endpoints that `huggingface_hub` calls;
the `hub` fixture in `conftest.py` installs it as huggingface_hub's HTTP client.
"""

from __future__ import annotations

import base64
import json

import httpx2


REPO = "someone/sks-dog-bayes-lora"
TOKEN = "hf_TESTtokenNEVERwritten0123456789"
COMMIT = "b" * 40


class FakeHub:
    """Answers the repo-creation, YAML-validation, preupload and commit endpoints; records every request."""

    def __init__(self):
        self.requests: list[tuple[str, str, str | None]] = []
        self.files: dict[str, bytes] = {}
        self.fail: dict[str, int] = {}  # path substring -> status code
        self.quote_auth = False  # failures quote the Authorization header, as some servers and proxies do

    def handle(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, path, request.headers.get("authorization")))
        for needle, status in self.fail.items():
            if needle in path:
                quoted = f"; you sent {request.headers.get('authorization')}" if self.quote_auth else ""
                return httpx2.Response(status, json={"error": f"refused by the fake Hub ({status}){quoted}"})
        if path == "/api/repos/create":
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{REPO}", "name": REPO, "id": "1"})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        if path == f"/api/models/{REPO}/preupload/main":
            files = json.loads(request.content)["files"]
            modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
            return httpx2.Response(200, json={"files": modes, "commitOid": "a" * 40})
        if path == f"/api/models/{REPO}/commit/main":
            for line in request.content.decode().splitlines():
                entry = json.loads(line)
                if entry["key"] == "file":
                    self.files[entry["value"]["path"]] = base64.b64decode(entry["value"]["content"])
            url = f"https://huggingface.co/{REPO}/commit/{COMMIT}"
            return httpx2.Response(200, json={"commitUrl": url, "commitOid": COMMIT, "pullRequestUrl": None})
        return httpx2.Response(404, json={"error": "not served by the fake Hub"})

    def paths(self) -> list[str]:
        return [path for _, path, _ in self.requests if path != "/api/agent-harnesses"]
