"""Uploading exports to the Hugging Face Hub: the folder is written locally (temporary), then
`HfApi.create_repo` + `HfApi.upload_folder` send it in one commit. The token goes only to `HfApi`; it
is never printed or logged here."""
from __future__ import annotations

import tempfile
from pathlib import Path

from .common import MARKER
from .gguf_export import quantization_methods, save_gguf
from .merged import check_save_method, save_merged
from .weights import DEFAULT_ADAPTER


def upload_folder(folder, repo_id: str, token=None, private=None, endpoint=None,
                  commit_message: str = "Upload with ahazero", allow_patterns=None) -> str:
    """Create `repo_id` if needed and commit `folder`'s files (our marker file left out); returns the commit url."""
    from huggingface_hub import HfApi
    api = HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                             allow_patterns=allow_patterns, ignore_patterns=[MARKER])
    return info.commit_url


def push_to_hub_merged(model, repo_id: str, tokenizer=None, save_method: str = "merged_16bit", token=None,
                       private=None, endpoint=None, adapter_name: str = DEFAULT_ADAPTER) -> str:
    """`save_merged` into a temporary folder, then upload it to `repo_id`; returns the commit url."""
    check_save_method(save_method)                        # bad input fails before any work or network
    with tempfile.TemporaryDirectory(prefix="ahazero-upload-") as tmp:
        folder = save_merged(model, Path(tmp) / "model", tokenizer, save_method=save_method,
                             adapter_name=adapter_name)
        return upload_folder(folder, repo_id, token, private, endpoint,
                             commit_message=f"Upload {save_method} model with ahazero")


def push_to_hub_gguf(model, repo_id: str, tokenizer, quantization_method="q8_0", token=None, endpoint=None,
                     private=None, adapter_name: str = DEFAULT_ADAPTER) -> str:
    """`save_gguf` into a temporary folder, then upload the .gguf files to `repo_id`; returns the commit url."""
    methods = quantization_methods(quantization_method)
    with tempfile.TemporaryDirectory(prefix="ahazero-upload-") as tmp:
        files = save_gguf(model, Path(tmp) / "gguf", tokenizer, methods, adapter_name=adapter_name)
        return upload_folder(files[0].parent, repo_id, token, private, endpoint, allow_patterns=["*.gguf"],
                             commit_message=f"Upload GGUF ({', '.join(methods)}) with ahazero")
