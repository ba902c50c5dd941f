"""Logs every Triton compile of this process to stderr: the kernel, the seconds it took, the seconds since
`install` and the frames of ours that launched it (bench/grpo_step.py --log-compiles). A compile in the middle
of a rollout is a stall of 0.2-6 s on the H200 machines' CPUs; this says which kernel and which call made it."""
from __future__ import annotations

import os
import sys
import time
import traceback


def install(frames: int = 5) -> None:
    import triton
    t0 = time.time()
    started: dict = {}

    def before(**kw):  # Triton's jit_cache_hook: True would skip the compile
        ours = [f for f in traceback.extract_stack() if f"{os.sep}ahazero{os.sep}" in f.filename]
        started[kw["key"]] = (time.time(), " <- ".join(f"{os.path.basename(f.filename)}:{f.lineno}:{f.name}"
                                                       for f in ours[::-1][:frames]))
        return False

    def after(**kw):
        start, where = started.pop(kw["key"], (time.time(), "?"))
        name = kw["repr"].split("[", 1)[0]
        print(f"[compile at {time.time() - t0:.1f} s, took {time.time() - start:.2f} s] {name} from {where}",
              file=sys.stderr, flush=True)

    triton.knobs.runtime.jit_cache_hook = before
    triton.knobs.runtime.jit_post_compile_hook = after
