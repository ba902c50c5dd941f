"""push_to_hub_merged / push_to_hub_gguf through huggingface_hub's real HfApi, against a local HTTP stand-in
for the hub (127.0.0.1) that answers the three endpoints an upload uses: repo creation, preupload, commit."""
import base64
import json
import logging
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from safetensors.torch import load

import tiny
from ahazero.export import push_to_hub_gguf, push_to_hub_merged
from ahazero.export.common import MARKER
from test_export_common import lora_model

TOKEN = "hf_secretTOKENnotToBePrinted123"


class FakeHub(BaseHTTPRequestHandler):
    """Records requests; files committed 'regular' (base64 in the ndjson commit) land in `server.files`."""

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.server.requests.append((self.path, self.headers.get("Authorization")))
        if self.path == "/api/repos/create":
            payload = json.loads(body)
            self.server.created.append(payload)
            return self._json({"url": f"{self.server.url}/{payload['organization']}/{payload['name']}"})
        if m := re.match(r"^/api/models/(.+)/preupload/([^/?]+)", self.path):
            files = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False, "oid": None}
                     for f in json.loads(body)["files"]]
            return self._json({"files": files, "commitOid": "0" * 40})
        if m := re.match(r"^/api/models/(.+)/commit/([^/?]+)", self.path):
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    self.server.files[item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            return self._json({"commitUrl": f"{self.server.url}/{m[1]}/commit/{'a' * 40}",
                               "commitOid": "a" * 40, "pullRequestUrl": None})
        self.send_error(404)

    def do_GET(self):                      # huggingface_hub's own side requests (agent registry): none here
        self.send_error(404)

    def _json(self, obj):
        data = json.dumps(obj).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub(monkeypatch):
    import huggingface_hub.constants
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.url = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)   # tests run offline; this is local
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", server.url)    # so nothing else leaves the host
    server.requests, server.created, server.files = [], [], {}
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_push_merged_uploads_the_folder_and_never_prints_the_token(hub, capsys, caplog):
    caplog.set_level(logging.DEBUG)
    model = lora_model("qwen2")
    url = push_to_hub_merged(model, "me/tiny-merged", tiny.tokenizer(), token=TOKEN, private=True, endpoint=hub.url)
    assert url.startswith(hub.url + "/me/tiny-merged/commit/")
    (created,) = hub.created
    assert (created["organization"], created["name"]) == ("me", "tiny-merged")
    assert created.get("visibility") == "private" or created.get("private") is True   # huggingface_hub 2.x / older
    assert {"config.json", "model.safetensors", "tokenizer.json", "generation_config.json"} <= set(hub.files)
    assert MARKER not in hub.files
    weights = load(hub.files["model.safetensors"])
    assert weights["model.layers.0.self_attn.q_proj.weight"].shape == (64, 64)
    assert all(auth == f"Bearer {TOKEN}" for _, auth in hub.requests)
    out = capsys.readouterr()
    assert TOKEN not in out.out + out.err + caplog.text


def test_push_gguf_uploads_only_gguf_files(hub):
    model = lora_model("qwen2")
    push_to_hub_gguf(model, "me/tiny-gguf", tiny.tokenizer(), quantization_method="q8_0", token=TOKEN, endpoint=hub.url)
    assert list(hub.files) == ["model.Q8_0.gguf"]
    assert hub.files["model.Q8_0.gguf"][:4] == b"GGUF"


def test_bad_methods_fail_before_any_request(hub):
    model = lora_model("qwen2")
    with pytest.raises(ValueError, match="valid"):
        push_to_hub_gguf(model, "me/x", tiny.tokenizer(), quantization_method="q3_x", token=TOKEN, endpoint=hub.url)
    with pytest.raises(ValueError, match="valid"):
        push_to_hub_merged(model, "me/x", tiny.tokenizer(), save_method="merged_8bit", token=TOKEN, endpoint=hub.url)
    assert hub.requests == []


def test_push_merged_4bit_uploads_nf4_weights_and_their_config(hub):
    model = lora_model("qwen2")
    push_to_hub_merged(model, "me/tiny-4bit", tiny.tokenizer(), save_method="merged_4bit", token=TOKEN,
                       endpoint=hub.url)
    weights = load(hub.files["model.safetensors"])
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == torch.uint8
    assert "model.layers.0.self_attn.q_proj.weight.quant_state.bitsandbytes__nf4" in weights
    assert json.loads(hub.files["config.json"])["quantization_config"]["bnb_4bit_quant_type"] == "nf4"
