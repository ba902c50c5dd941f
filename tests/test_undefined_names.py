"""No undefined name in the package: code that only CUDA runs (the offload's streams, the layer graphs) is
not reached by the CPU tests, so a name lost in an edit would first fail on the GPU machine."""
from pathlib import Path

import pytest

pyflakes_api = pytest.importorskip("pyflakes.api")
from pyflakes import reporter as pyflakes_reporter  # noqa: E402

SRC = Path(__file__).resolve().parents[1] / "src" / "ahazero"


class _Collect(pyflakes_reporter.Reporter):
    def __init__(self):
        self.messages = []

    def flake(self, message):
        self.messages.append(str(message))

    def syntaxError(self, filename, msg, lineno, offset, text):  # noqa: N802 - pyflakes' name
        self.messages.append(f"{filename}:{lineno}: {msg}")

    def unexpectedError(self, filename, msg):  # noqa: N802 - pyflakes' name
        self.messages.append(f"{filename}: {msg}")


def test_no_undefined_names_in_the_package():
    report = _Collect()
    for path in sorted(SRC.rglob("*.py")):
        pyflakes_api.check(path.read_text(), str(path), report)
    undefined = [m for m in report.messages if "undefined name" in m or "rror" in m]
    assert not undefined, "\n".join(undefined)
