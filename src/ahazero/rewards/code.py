"""A reward that runs model-written Python against test cases, in a sandbox.

`code_reward(tests_column="tests", ...)` returns a TRL-convention reward function
`f(prompts, completions, completion_ids=None, **columns, trainer_state=None) -> list[float | None]`.
For each completion it takes the code (the last ```python fenced block, inside `<answer>...</answer>`
when there is one; else the `<answer>` text itself), runs it with the row's tests and scores the
fraction passed. No code, a syntax error, a crash, a timeout or a broken limit scores 0.0; a row
without tests scores None (TRL: "not applicable").

Test formats (the `tests_column` value of a row; a JSON string of either form is decoded first):
- asserts: a list of Python snippets, e.g. MBPP's `["assert add(1, 2) == 3", ...]`, or one source
  string whose top-level `assert`s are the tests (its other statements run before each). The program
  runs once as module `solution` (so its `if __name__ == "__main__":` block does not run, stdin is
  empty); each snippet then runs in its namespace and passes if it raises nothing.
  Caveat: an object with an always-true `__eq__` passes `assert f(x) == y`; I/O tests cannot be
  fooled that way.
- I/O: `[{"input": "1 2\\n", "output": "3\\n"}, ...]` or `{"inputs": [...], "outputs": [...]}`
  (APPS style). The program runs as `__main__` once per case with `input` on stdin; the case passes
  if it exits normally and stdout equals `output` up to trailing whitespace on each line and trailing
  blank lines. A Python exception fails that case only; a timeout or crash scores the completion 0.

After each call, `f.last_stats = {"timeouts": k, "errors": m, "no_code": z, "scored": n}` (counts of
completions in the batch; log as `rewards/<name>/timeouts` ...), `f.last_results` (per completion:
score, outcome, detail) and `f.last_isolation` (which sandbox layers were in force). `f` never raises.

Processes: one supervisor process per batch (`python -I -S code.py supervise`, stdlib only) runs the
programs, `workers` at a time. Each program run is: setup process (limits, namespaces, as the caller)
-> fork into a new PID namespace -> exec of a fresh `python -I -S -B code.py guest`, which installs
an audit hook and runs the code. What protects against what ("ns" = namespaces on, the default
when running as root where the kernel allows it; "fallback" = not root, or the kernel refused):

- time: RLIMIT_CPU (ceil(timeout)+1 s) and a wall clock: SIGKILL after `timeout` + 1 s. Both.
- memory: RLIMIT_AS (`memory_mb`). Both.
- output: stdout/stderr go to memfds; RLIMIT_FSIZE caps them and every file written
  (`max_output_bytes`); ns: the workdir is a `disk_mb` tmpfs. More bytes than the cap is an error.
- processes: ns: a pids cgroup (`max_processes`; v1, or v2 where delegated), and the PID namespace
  dies with the program. Fallback: RLIMIT_NPROC (not root); as root, RLIMIT_NPROC does not bind, so
  the hook blocks fork. Leftovers are killed by cgroup, else found by their unique HOME.
  RLIMIT_NPROC counts all of the user's processes, so runs in flight at once share one budget:
  a fork bomb can make a concurrent run's fork fail (then that run scores 0; use workers=1).
- network: ns: a new network namespace (only a loopback, down) + the hook. Fallback: the hook
  (blocks every socket event).
- files: ns: a private mount namespace where every mount is remounted read-only except the workdir,
  /root and /home are covered by empty tmpfs (the interpreter's own dirs bound back), /dev holds only
  null/zero/full/random/urandom (no disks), /proc is the PID namespace's own. The hook also limits
  writes to the workdir and reads to it plus Python's own paths. Fallback: the hook only (plus file
  permissions).
- environment: nothing inherited (HOME/TMPDIR = the workdir, PATH, locale), `-I`. Both.
- privileges: as root, all capabilities dropped (bounding set too, securebits locked, no_new_privs);
  the uid stays 0, which is why the read-only mounts matter. Not root: the caller's uid.
- other processes: ns: the PID namespace hides them. Fallback: the hook blocks os.kill of others.
- exec: the hook blocks exec/spawn/system and imports of ctypes, cffi, _posixsubprocess and
  subinterpreters, so `subprocess` and `asyncio` cannot be imported inside the sandbox.

The audit hook (PEP 578) is defence in depth, not a boundary (CPython's own docs say so). Its
policy, the C functions it calls and the builtins it uses are bound when it is made, so rebinding
builtins, `os.path` or the harness's globals does not change it (tested); C extensions that do file
or socket I/O without audit events would pass it, and with namespaces off it is the only guard on
the network and the filesystem. Not defended: the result channel carries a random nonce that a
program could dig out of the harness's frames (reward hacking, not escape); a fallback-mode program
can leave files in world-writable dirs (/tmp, /dev/shm).
"""
from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import asdict, dataclass

_THIS_FILE = os.path.abspath(__file__)
_STARTUP_GRACE_S = 1.0            # wall time allowed on top of `timeout` for two interpreter starts
_DETAIL_CHARS = 200


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SandboxLimits:
    """Limits for one program run."""

    timeout: float = 5.0               # wall seconds per run (+1 s start-up); CPU limit ceil(timeout)+1
    memory_mb: int = 512               # address space (RLIMIT_AS); Python itself needs ~64 MB
    max_output_bytes: int = 1 << 20    # stdout, stderr and any one file written (RLIMIT_FSIZE)
    max_processes: int = 16            # processes and threads the program may add
    disk_mb: int = 32                  # size of the tmpfs working directory (namespaces only)
    namespaces: bool = True            # use namespaces/cgroups where possible; False: fallback layers only
    audit_hook: bool = True            # False only to test the kernel layers on their own
    site_packages: bool = True         # let programs import installed packages (numpy, ...)

    def __post_init__(self):
        for name in ("timeout", "memory_mb", "max_output_bytes", "max_processes", "disk_mb"):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxLimits.{name} must be > 0, got {getattr(self, name)!r}")


# ----------------------------------------------------------------------------------------------
# Parsing completions and tests (pure functions)
# ----------------------------------------------------------------------------------------------

_ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_FENCE_RE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)
_PYTHON_TAGS = ("python", "py", "python3")


def _completion_text(completion) -> str:
    """The text of a completion: a string, or the last message's content in a conversation."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)) and completion and isinstance(completion[-1], dict):
        content = completion[-1].get("content", "")
        if isinstance(content, list):
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        return content if isinstance(content, str) else ""
    return ""


def extract_code(text: str) -> str | None:
    """The program in a completion: last python (else untagged) fenced block, else the <answer> text."""
    import textwrap
    answers = _ANSWER_RE.findall(text)
    scope = answers[-1] if answers else text
    blocks = _FENCE_RE.findall(scope)
    for wanted in (lambda tag: tag.lower() in _PYTHON_TAGS, lambda tag: tag == ""):
        bodies = [body for tag, body in blocks if wanted(tag)]
        if bodies and bodies[-1].strip():
            return bodies[-1]
    if answers and answers[-1].strip() and not blocks:
        return textwrap.dedent(answers[-1]).strip("\n") + "\n"
    return None


def _split_asserts(source: str) -> list[str]:
    """Tests of a source string: each top-level assert, preceded by the non-assert statements."""
    import ast
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [source]
    setup = [ast.get_source_segment(source, s) for s in tree.body if not isinstance(s, ast.Assert)]
    asserts = [ast.get_source_segment(source, s) for s in tree.body if isinstance(s, ast.Assert)]
    if not asserts:
        return [source]
    prefix = "\n".join(setup) + "\n" if setup else ""
    return [prefix + a for a in asserts]


def _io_pairs(inputs, outputs) -> list[list[str]] | None:
    def text(v):
        return "\n".join(map(str, v)) + "\n" if isinstance(v, (list, tuple)) else str(v)
    if not isinstance(inputs, (list, tuple)) or not isinstance(outputs, (list, tuple)):
        return None
    if len(inputs) != len(outputs) or not inputs:
        return None
    return [[text(i), text(o)] for i, o in zip(inputs, outputs)]


def parse_tests(value) -> tuple[str, list] | None:
    """A row's tests as ("asserts", [snippet, ...]) or ("io", [[stdin, stdout], ...]); None if unusable."""
    if isinstance(value, str):
        stripped = value.strip()
        if not stripped:
            return None
        if stripped[0] in "[{":
            try:
                return parse_tests(json.loads(stripped))
            except (ValueError, RecursionError):
                pass
        return "asserts", _split_asserts(value)
    if isinstance(value, dict):
        pairs = _io_pairs(value.get("inputs"), value.get("outputs"))
        return ("io", pairs) if pairs else None
    if isinstance(value, (list, tuple)) and value:
        if all(isinstance(t, str) for t in value):
            return "asserts", list(value)
        if all(isinstance(t, dict) and "input" in t and "output" in t for t in value):
            return "io", _io_pairs([t["input"] for t in value], [t["output"] for t in value])
    return None


def same_output(got: str, expected: str) -> bool:
    """Equal up to trailing whitespace on each line, trailing blank lines and CRLF."""
    def lines(s):
        out = [line.rstrip() for line in s.replace("\r\n", "\n").split("\n")]
        while out and not out[-1]:
            out.pop()
        return out
    return lines(got) == lines(expected)


# ----------------------------------------------------------------------------------------------
# The reward function (trainer side)
# ----------------------------------------------------------------------------------------------

def code_reward(tests_column: str = "tests", *, timeout: float = 5.0, memory_mb: int = 512,
                max_output_bytes: int = 1 << 20, max_processes: int = 16, disk_mb: int = 32,
                workers: int | None = None, namespaces: bool = True, audit_hook: bool = True,
                site_packages: bool = True, name: str = "code_reward"):
    """A reward function scoring each completion's program by the fraction of its row's tests passed.

    `workers` programs run at once (default: half the CPU cores, 2 to 8); the other arguments are
    `SandboxLimits`. See the module docstring for test formats, `last_stats` and the sandbox."""
    limits = SandboxLimits(timeout, memory_mb, max_output_bytes, max_processes, disk_mb, namespaces,
                           audit_hook, site_packages)
    workers = max(1, int(workers)) if workers else min(8, max(2, (os.cpu_count() or 2) // 2))

    def reward(prompts=None, completions=None, completion_ids=None, trainer_state=None, **columns):
        completions = list(completions or [])
        if tests_column not in columns and not reward.warned_missing_column:
            import warnings
            warnings.warn(f"{name}: the batch has no {tests_column!r} column; every score is None")
            reward.warned_missing_column = True
        try:
            scores, results, isolation = _score_batch(completions, columns.get(tests_column),
                                                      limits, workers)
        except Exception as e:  # never raise into training: score 0, count as errors, say why
            import warnings
            warnings.warn(f"{name}: sandbox failed ({type(e).__name__}: {e}); scoring the batch 0")
            scores = [0.0] * len(completions)
            results = [{"score": 0.0, "outcome": "error", "detail": f"sandbox: {e}"}] * len(completions)
            isolation = {}
        reward.last_stats = _stats(results)
        reward.last_results = results
        reward.last_isolation = isolation
        return scores

    reward.__name__ = reward.__qualname__ = name
    reward.limits = limits
    reward.last_stats = _stats([])
    reward.last_results = []
    reward.last_isolation = {}
    reward.warned_missing_column = False
    return reward


def _stats(results: list[dict | None]) -> dict[str, int]:
    outcomes = [r["outcome"] for r in results if r is not None]
    return {"timeouts": outcomes.count("timeout"), "errors": outcomes.count("error"),
            "no_code": outcomes.count("no_code"), "scored": len(outcomes)}


def _score_batch(completions, column, limits: SandboxLimits, workers: int):
    """Scores, per-completion results and the isolation report for one batch."""
    n = len(completions)
    if column is None:
        column = [None] * n
    results: list[dict | None] = [None] * n
    jobs, owners = [], {}                 # identical (code, tests) pairs run once
    for i in range(n):
        spec = parse_tests(column[i]) if i < len(column) else None
        if spec is None:
            continue
        code = extract_code(_completion_text(completions[i]))
        if code is None:
            results[i] = {"score": 0.0, "outcome": "no_code", "detail": "no code found"}
            continue
        key = json.dumps([code, spec])
        if key not in owners:
            owners[key] = len(jobs)
            jobs.append({"code": code, "kind": spec[0], "tests": spec[1]})
        results[i] = owners[key]
    ran, isolation = run_jobs(jobs, limits, workers) if jobs else ([], {})
    results = [ran[r] if isinstance(r, int) else r for r in results]
    scores = [None if r is None else float(r["score"]) for r in results]
    return scores, results, isolation


def run_jobs(jobs: list[dict], limits: SandboxLimits, workers: int = 2) -> tuple[list[dict], dict]:
    """Run jobs ({"code", "kind", "tests"}) in one supervisor process; results and isolation report."""
    import signal
    import subprocess
    request = json.dumps({"jobs": jobs, "limits": asdict(limits), "workers": workers}).encode()
    runs = sum(len(j["tests"]) if j["kind"] == "io" else 1 for j in jobs)
    budget = runs * (limits.timeout + _STARTUP_GRACE_S + 1.0) / workers + 60.0
    proc = subprocess.Popen([sys.executable, "-I", "-S", "-B", _THIS_FILE, "supervise"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=_base_env(), cwd="/", start_new_session=True)
    try:
        out, err = proc.communicate(request, timeout=budget)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        raise RuntimeError(f"supervisor ran past {budget:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"supervisor exited {proc.returncode}: {err.decode(errors='replace')[-500:]}")
    reply = json.loads(out)
    return reply["results"], reply["isolation"]


def _base_env() -> dict[str, str]:
    return {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8"}


# ----------------------------------------------------------------------------------------------
# Supervisor: one process per batch, runs each program in its own sandboxed child
# ----------------------------------------------------------------------------------------------

def _supervise() -> None:
    """Read jobs on stdin, run them `workers` at a time, write results as JSON on stdout."""
    from concurrent.futures import ThreadPoolExecutor
    request = json.load(sys.stdin)
    limits, jobs = request["limits"], request["jobs"]
    cgroups = _pids_cgroup_base() if (limits["namespaces"] and os.geteuid() == 0) else None
    with ThreadPoolExecutor(max(1, request["workers"])) as pool:
        done = list(pool.map(lambda job: _run_job(job, limits, cgroups), jobs))
    isolation = next((d.pop("isolation") for d in done if d.get("isolation")), {})
    for d in done:
        d.pop("isolation", None)
    json.dump({"results": done, "isolation": isolation}, sys.stdout)


def _run_job(job: dict, limits: dict, cgroups: str | None) -> dict:
    """Score one program on its tests: one run for asserts, one run per case for I/O."""
    tests = job["tests"]
    if job["kind"] == "asserts":
        run = _run_program(job["code"], "asserts", tests, "", limits, cgroups)
        if run["outcome"] != "ok":
            return _job_result(0.0, run["outcome"], run["detail"], run["isolation"])
        passed = sum(map(bool, run["record"].get("passed", [])))
        return _job_result(passed / len(tests), "ok", f"{passed}/{len(tests)} asserts", run["isolation"])
    passed, isolation = 0, None
    for stdin, expected in tests:
        run = _run_program(job["code"], "io", None, stdin, limits, cgroups)
        isolation = isolation or run["isolation"]
        if run["outcome"] != "ok":
            return _job_result(0.0, run["outcome"], run["detail"], isolation)
        passed += run["record"].get("status") == "ok" and same_output(run["stdout"], expected)
    return _job_result(passed / len(tests), "ok", f"{passed}/{len(tests)} cases", isolation)


def _job_result(score: float, outcome: str, detail: str, isolation) -> dict:
    return {"score": score, "outcome": outcome, "detail": detail, "isolation": isolation}


def _run_program(code: str, mode: str, tests, stdin: str, limits: dict, cgroups: str | None) -> dict:
    """One sandboxed run: {"outcome": ok|timeout|error, "detail", "record", "stdout", "isolation"}."""
    import secrets
    import tempfile
    nonce = secrets.token_hex(16)
    jobdir = tempfile.mkdtemp(prefix="ahazero-sbx-")
    work = os.path.join(jobdir, "work")
    fds = {}
    try:
        os.mkdir(work, 0o700)
        cgroup = _make_cgroup(cgroups, nonce[:16], limits["max_processes"] + 2) if cgroups else None
        config = {"nonce": nonce, "mode": mode, "code": code, "tests": tests, "work": work,
                  "limits": limits, "cgroup": cgroup}
        for name, data in (("config", json.dumps(config).encode()), ("stdin", stdin.encode()),
                           ("stdout", b""), ("stderr", b""), ("result", b"")):
            fds[name] = _memfd(name, data)
        returncode, timed_out = _launch(fds, work, limits, cgroup)
        return _classify(mode, timed_out, returncode, fds, nonce, limits["max_output_bytes"])
    except Exception as e:   # the sandbox itself failed (e.g. no memory to fork): an error, not a crash
        return {"outcome": "error", "detail": f"sandbox: {type(e).__name__}: {e}", "record": {},
                "stdout": "", "isolation": None}
    finally:
        for fd in fds.values():
            os.close(fd)
        _remove_tree(jobdir)


def _launch(fds: dict, work: str, limits: dict, cgroup: str | None) -> tuple[int, bool]:
    """Start the setup stage, wait at most timeout + grace, then kill everything the run left."""
    import subprocess
    proc = subprocess.Popen(
        [sys.executable, "-I", "-S", "-B", _THIS_FILE, "setup", str(fds["config"]), str(fds["result"])],
        stdin=fds["stdin"], stdout=fds["stdout"], stderr=fds["stderr"],
        pass_fds=(fds["config"], fds["result"]), env=_sandbox_env(work), cwd=work, start_new_session=True)
    timed_out = False
    try:
        proc.wait(timeout=limits["timeout"] + _STARTUP_GRACE_S)
    except subprocess.TimeoutExpired:
        timed_out = True
    _kill_group(proc)
    if cgroup:
        _remove_cgroup(cgroup)
    else:    # no cgroup: find stragglers (setsid escapes the group) by their unique HOME
        _kill_by_environ(f"HOME={work}".encode())
    return proc.returncode, timed_out


def _kill_by_environ(marker: bytes) -> int:
    """SIGKILL every process whose initial environment holds `marker`, rescanning until none is
    left (a dying process stops matching once its memory is gone); returns how many were seen."""
    import signal
    import time
    seen: set[int] = set()
    for _ in range(200):
        found = set()
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/environ", "rb") as f:
                    if marker in f.read().split(b"\0"):
                        os.kill(int(pid), signal.SIGKILL)
                        found.add(int(pid))
            except OSError:
                continue
        if not found:
            break
        seen |= found
        time.sleep(0.005)
    return len(seen)


def _remove_tree(path: str) -> None:
    """Remove a run's directory, even where the program took away permissions inside it."""
    import shutil
    shutil.rmtree(path, ignore_errors=True)
    if os.path.exists(path):
        for top, subdirs, _ in os.walk(path):
            for d in subdirs:
                try:
                    os.chmod(os.path.join(top, d), 0o700)
                except OSError:
                    pass
        shutil.rmtree(path, ignore_errors=True)


def _memfd(name: str, data: bytes) -> int:
    """An anonymous in-memory file holding `data`, positioned at its start (no path to find it by)."""
    fd = os.memfd_create(f"ahazero-{name}")
    os.write(fd, data)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _sandbox_env(work: str) -> dict[str, str]:
    """The program's whole environment: nothing inherited, home and temp in the workdir."""
    return {**_base_env(), "HOME": work, "TMPDIR": work, "TMP": work, "TEMP": work,
            "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
            "MALLOC_ARENA_MAX": "2"}


def _kill_group(proc) -> None:
    """SIGKILL the run's process group (a no-op when it is gone) and reap the setup process."""
    import signal
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


def _read_all(fd: int, limit: int) -> bytes:
    return os.pread(fd, limit, 0)


def _records(fd: int, nonce: str, limit: int) -> dict[str, dict]:
    """The trusted records ("setup", "result") in the result file: lines that start with the nonce."""
    found = {}
    for line in _read_all(fd, limit).split(b"\n"):
        parts = line.split(b" ", 2)
        if len(parts) == 3 and parts[0] == nonce.encode():
            try:
                found[parts[1].decode()] = json.loads(parts[2])
            except ValueError:
                pass
    return found


def _classify(mode, timed_out, returncode, fds, nonce, max_output) -> dict:
    """Outcome of a run from its exit, its records and its output size."""
    records = _records(fds["result"], nonce, max_output + 1)
    setup, result = records.get("setup", {}), records.get("result")
    stdout = _read_all(fds["stdout"], max_output + 1)
    stderr = _read_all(fds["stderr"], 2000).decode(errors="replace")

    def out(outcome, detail, record=None):
        return {"outcome": outcome, "detail": str(detail)[:_DETAIL_CHARS], "record": record or {},
                "stdout": stdout.decode(errors="replace"), "isolation": setup.get("isolation")}

    if timed_out:
        return out("timeout", "wall-clock limit")
    if setup.get("fatal"):
        return out("error", f"sandbox setup failed: {setup['fatal']}")
    if len(stdout) > max_output or os.fstat(fds["stderr"]).st_size > max_output:
        return out("error", "output limit")
    if result is None:
        signal_number = returncode - 128 if returncode > 128 else -returncode if returncode < 0 else 0
        if signal_number == 24:  # SIGXCPU
            return out("timeout", "CPU-time limit")
        if mode == "io" and returncode == 0:  # os._exit(0): stdout still decides
            return out("ok", "exited", {"status": "ok"})
        return out("error", f"no result (exit {returncode}); {stderr[-150:]}")
    status = result.get("status")
    if status in ("compile_error", "memory", "output_limit") or (mode == "asserts" and status != "ok"):
        return out("error", f"{status}: {result.get('detail', '')}", result)
    return out("ok", status, result)


# cgroups (v1 pids hierarchy, or v2 where pids is delegated to us) --------------------------------

def _pids_cgroup_base() -> str | None:
    """A directory under our own pids cgroup where per-run cgroups can be made, or None."""
    try:
        with open("/proc/self/mountinfo") as f:
            mounts = [line.split() for line in f]
        with open("/proc/self/cgroup") as f:
            lines = [line.rstrip("\n").split(":", 2) for line in f]
        own = {c: path for _, cs, path in lines for c in cs.split(",")}   # controller -> our cgroup
        for want in ("pids", ""):          # cgroup v1 pids hierarchy first, else the v2 unified one
            for fields in mounts:
                sep = fields.index("-")
                fstype, options = fields[sep + 1], fields[sep + 3].split(",")
                if (want == "pids" and fstype == "cgroup" and "pids" in options) or \
                        (want == "" and fstype == "cgroup2"):
                    mount_root, point, path = fields[3], fields[4], own.get(want, "/")
                    inner = path[len(mount_root):] if path.startswith(mount_root) else path
                    here = os.path.normpath(point + "/" + inner)
                    return _v1_base(here) if want == "pids" else _v2_base(here)
    except (OSError, ValueError):
        return None
    return None


def _v1_base(own: str) -> str:
    base = os.path.join(own, "ahazero-sandbox")
    os.makedirs(base, exist_ok=True)
    return base


def _v2_base(own: str) -> str | None:
    base = os.path.join(own, "ahazero-sandbox")
    try:
        os.makedirs(base, exist_ok=True)
        for d in (own, base):
            with open(os.path.join(d, "cgroup.subtree_control"), "w") as f:
                f.write("+pids")
    except OSError:
        return None
    return base


def _make_cgroup(base: str, name: str, max_pids: int) -> str | None:
    path = os.path.join(base, f"run-{name}")
    try:
        os.mkdir(path)
        with open(os.path.join(path, "pids.max"), "w") as f:
            f.write(str(max_pids))
        return path
    except OSError:
        return None


def _remove_cgroup(path: str) -> None:
    """Kill whatever is left in a run's cgroup (escaped process groups included), then remove it."""
    import signal
    import time
    for _ in range(200):
        try:
            with open(os.path.join(path, "cgroup.procs")) as f:
                pids = [int(p) for p in f.read().split()]
        except OSError:
            return
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.01)
    for _ in range(100):
        try:
            os.rmdir(path)
            return
        except OSError:
            time.sleep(0.01)


# ----------------------------------------------------------------------------------------------
# Setup: limits and namespaces, then exec the guest (runs before any model-written code)
# ----------------------------------------------------------------------------------------------

CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWIPC = 0x00020000, 0x04000000, 0x08000000
CLONE_NEWPID, CLONE_NEWNET = 0x20000000, 0x40000000
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_REMOUNT = 1, 2, 4, 8, 32
MS_NOATIME, MS_NODIRATIME, MS_BIND, MS_REC = 1024, 2048, 4096, 16384
MS_PRIVATE, MS_RELATIME = 1 << 18, 1 << 21
_MOUNT_FLAGS = {"nosuid": MS_NOSUID, "nodev": MS_NODEV, "noexec": MS_NOEXEC, "noatime": MS_NOATIME,
                "nodiratime": MS_NODIRATIME, "relatime": MS_RELATIME}
PR_SET_PDEATHSIG, PR_CAPBSET_DROP, PR_SET_SECUREBITS, PR_SET_NO_NEW_PRIVS = 1, 24, 28, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SECUREBITS_LOCKED_NOROOT = 0xEF   # NOROOT, NO_SETUID_FIXUP, NO_CAP_AMBIENT_RAISE, KEEP_CAPS off; all locked
_HIDDEN_DIRS = ("/root", "/home")
_DEVICES = ("null", "zero", "full", "random", "urandom")


class _Libc:
    """The few libc calls Python's os module lacks (before 3.12): unshare, mount, prctl, capset."""

    def __init__(self):
        import ctypes
        self.ctypes = ctypes
        self.lib = ctypes.CDLL(None, use_errno=True)

    def _check(self, result: int, what: str) -> None:
        if result != 0:
            err = self.ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def unshare(self, flags: int) -> None:
        self._check(self.lib.unshare(flags), "unshare")

    def mount(self, source, target, fstype, flags, data=None) -> None:
        enc = lambda s: None if s is None else os.fsencode(s)
        ul = self.ctypes.c_ulong
        self._check(self.lib.mount(enc(source), enc(target), enc(fstype), ul(flags), enc(data)),
                    f"mount {target}")

    def prctl(self, option: int, arg: int = 0) -> None:
        ul = self.ctypes.c_ulong
        self._check(self.lib.prctl(option, ul(arg), ul(0), ul(0), ul(0)), f"prctl {option}")

    def clear_capabilities(self) -> None:
        header = (self.ctypes.c_uint32 * 2)(0x20080522, 0)   # _LINUX_CAPABILITY_VERSION_3, this thread
        data = (self.ctypes.c_uint32 * 6)()                  # effective, permitted, inheritable: none
        self._check(self.lib.capset(header, data), "capset")


def _setup_main(config_fd: int, result_fd: int) -> None:
    """Apply limits and isolation, then exec the guest. Any failure is reported, never ignored."""
    config = json.loads(_read_fd(config_fd))
    iso: dict = {}
    try:
        _setup(config, iso, config_fd, result_fd)
    except BaseException as e:  # report and stop: never run the program half-isolated by accident
        _write_record(result_fd, config["nonce"], "setup", {"fatal": f"{type(e).__name__}: {e}",
                                                           "isolation": iso})
        os._exit(70)


def _setup(config: dict, iso: dict, config_fd: int, result_fd: int) -> None:
    limits = config["limits"]
    root = os.geteuid() == 0
    if config["cgroup"]:
        with open(os.path.join(config["cgroup"], "cgroup.procs"), "w") as f:
            f.write(str(os.getpid()))
        iso["processes"] = "pids cgroup"
    iso.setdefault("processes", "RLIMIT_NPROC" if not root else "fork blocked by audit hook")
    if iso["processes"] == "fork blocked by audit hook" and not limits["audit_hook"]:
        raise RuntimeError("root without a pids cgroup needs the audit hook to bound processes")
    libc = _Libc() if root else None
    namespaces = _unshare_each(libc) if (libc and limits["namespaces"]) else {}
    iso["namespaces"] = sorted(n for n, ok in namespaces.items() if ok)
    iso["network"] = "network namespace" if namespaces.get("net") else "audit hook"
    _set_rlimits(limits, root)
    if namespaces.get("pid"):
        _fork_into_pid_namespace()
    if namespaces.get("mount"):
        iso["filesystem"] = _prepare_filesystem(libc, config["work"], limits["disk_mb"],
                                                namespaces.get("pid"))
    if libc:
        iso["capabilities"] = _drop_privileges(libc)
    if namespaces.get("pid"):
        libc.prctl(PR_SET_PDEATHSIG, 9)     # the setup parent dies (timeout kill) -> so do we all
    config.update(allow_fork=iso["processes"] != "fork blocked by audit hook",
                  allow_kill=bool(namespaces.get("pid")))
    _write_record(result_fd, config["nonce"], "setup", {"isolation": iso})
    _exec_guest(config, config_fd, result_fd)


def _exec_guest(config: dict, config_fd: int, result_fd: int) -> None:
    """Replace this process by a fresh interpreter (no ctypes loaded) that reads `config` from `config_fd`."""
    os.chdir(config["work"])
    guest_fd = _memfd("guest", json.dumps(config).encode())
    os.dup2(guest_fd, config_fd)
    os.close(guest_fd)
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-B", _THIS_FILE, "guest",
                              str(config_fd), str(result_fd)])


def _read_fd(fd: int) -> bytes:
    return os.pread(fd, os.fstat(fd).st_size, 0)


def _write_record(fd: int, nonce: str, kind: str, record: dict) -> None:
    os.write(fd, f"\n{nonce} {kind} {json.dumps(record)}\n".encode())


def _unshare_each(libc: _Libc) -> dict[str, bool]:
    """Enter new namespaces one by one; a kernel or container that refuses one leaves it False."""
    done = {}
    for name, flag in (("net", CLONE_NEWNET), ("ipc", CLONE_NEWIPC), ("uts", CLONE_NEWUTS),
                       ("mount", CLONE_NEWNS), ("pid", CLONE_NEWPID)):
        try:
            libc.unshare(flag)
            done[name] = True
        except OSError:
            done[name] = False
    if done["mount"]:
        try:
            libc.mount(None, "/", None, MS_REC | MS_PRIVATE)   # nothing we mount leaks to the host
        except OSError:
            done["mount"] = False                             # so mount nothing at all
    return done


def _set_rlimits(limits: dict, root: bool) -> None:
    import math
    import resource as r
    cpu = math.ceil(limits["timeout"]) + 1
    memory = limits["memory_mb"] << 20
    nproc = limits["max_processes"] + (0 if root else _tasks_of_user(os.getuid()))
    output = limits["max_output_bytes"] + 1          # one byte more than allowed: overflow is visible
    for which, soft, hard in ((r.RLIMIT_CPU, cpu, cpu + 1), (r.RLIMIT_AS, memory, memory),
                              (r.RLIMIT_FSIZE, output, output), (r.RLIMIT_NOFILE, 256, 256),
                              (r.RLIMIT_CORE, 0, 0), (r.RLIMIT_NPROC, nproc, nproc)):
        r.setrlimit(which, (soft, hard))


def _tasks_of_user(uid: int) -> int:
    """Threads now owned by `uid` (RLIMIT_NPROC counts them all, so the limit is this plus ours)."""
    count = 0
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            if os.stat(f"/proc/{pid}").st_uid == uid:
                count += len(os.listdir(f"/proc/{pid}/task"))
        except OSError:
            pass
    return count


def _fork_into_pid_namespace() -> None:
    """Fork: the child (PID 1 of the new namespace) returns; the parent waits and exits as it did."""
    pid = os.fork()
    if pid == 0:
        return
    _, status = os.waitpid(pid, 0)
    os._exit(128 + os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status))


def _prepare_filesystem(libc: _Libc, work: str, disk_mb: int, own_proc: bool) -> dict:
    """Private tmpfs workdir, hidden home dirs, minimal /dev, own /proc, everything else read-only.
    Each step is best-effort: a failure is reported (and the audit hook still guards that door)."""
    report = {}
    steps = (("workdir", lambda: _mount_tmpfs(libc, work, f"size={disk_mb}m,mode=0700")),
             ("hidden", lambda: _hide_dirs(libc, _interpreter_paths())),
             ("dev", lambda: _minimal_dev(libc)),
             ("proc", lambda: _own_proc(libc) if own_proc else "host"))
    for name, step in steps:
        try:
            report[name] = step()
        except OSError as e:
            report[name] = f"failed: {e}"
    report["not_readonly"] = _remount_readonly(libc, skip=(work,))
    return report


def _mount_tmpfs(libc: _Libc, where: str, options: str) -> str:
    libc.mount("tmpfs", where, "tmpfs", MS_NOSUID | MS_NODEV, options)
    return f"tmpfs ({options})"


def _own_proc(libc: _Libc) -> str:
    """A /proc for the new PID namespace: the host's processes are not even visible."""
    libc.mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC)
    return "own"


def _interpreter_paths() -> list[str]:
    """Directories the guest interpreter reads: its prefixes, stdlib, site-packages, this file's dir."""
    import site
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(sys.executable), os.path.dirname(_THIS_FILE), *sys.path,
             *site.getsitepackages()]
    return sorted({os.path.realpath(p) for p in paths if p and os.path.exists(p)})


def _hide_dirs(libc: _Libc, keep: list[str]) -> list[str]:
    """Cover /root and /home with empty tmpfs, binding back only the interpreter's own dirs."""
    hidden = []
    for top in _HIDDEN_DIRS:
        inside = [k for k in keep if k.startswith(top + "/")]
        if not os.path.isdir(top) or any(top == k or top.startswith(k + "/") for k in keep):
            continue
        inside = [k for k in inside if not any(k.startswith(o + "/") for o in inside)]
        fds = [(k, os.open(k, os.O_PATH)) for k in inside]
        libc.mount("tmpfs", top, "tmpfs", MS_NOSUID | MS_NODEV, "size=1m,mode=0755")
        for path, fd in fds:
            _make_mount_point(path, is_dir=os.path.isdir(f"/proc/self/fd/{fd}"))
            libc.mount(f"/proc/self/fd/{fd}", path, None, MS_BIND | MS_REC)
            os.close(fd)
        hidden.append(top)
    return hidden


def _make_mount_point(path: str, is_dir: bool) -> None:
    os.makedirs(path if is_dir else os.path.dirname(path), exist_ok=True)
    if not is_dir:
        open(path, "a").close()


def _minimal_dev(libc: _Libc) -> str:
    """Replace /dev with a tmpfs holding only null, zero, full, random, urandom (no disks, no shm)."""
    fds = {name: os.open(f"/dev/{name}", os.O_PATH) for name in _DEVICES if os.path.exists(f"/dev/{name}")}
    libc.mount("tmpfs", "/dev", "tmpfs", MS_NOSUID | MS_NOEXEC, "size=64k,mode=0755")
    for name, fd in fds.items():
        open(f"/dev/{name}", "w").close()
        libc.mount(f"/proc/self/fd/{fd}", f"/dev/{name}", None, MS_BIND)
        os.close(fd)
    for name, target in (("fd", "/proc/self/fd"), ("stdin", "/proc/self/fd/0"),
                         ("stdout", "/proc/self/fd/1"), ("stderr", "/proc/self/fd/2")):
        os.symlink(target, f"/dev/{name}")
    return "minimal"


def _mount_points() -> list[tuple[str, list[str]]]:
    """(mount point, per-mount options) of this mount namespace, from /proc/self/mountinfo."""
    unescape = lambda s: re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), s)
    with open("/proc/self/mountinfo") as f:
        return [(unescape(fields[4]), fields[5].split(",")) for fields in map(str.split, f)]


def _remount_readonly(libc: _Libc, skip: tuple[str, ...]) -> list[str]:
    """Remount every visible mount read-only (bind remount keeps its other flags); return failures."""
    import errno
    failures = []
    for point, options in _mount_points():
        if point in skip or "ro" in options:
            continue
        flags = MS_REMOUNT | MS_BIND | MS_RDONLY
        flags |= sum(bit for name, bit in _MOUNT_FLAGS.items() if name in options)
        try:
            libc.mount(None, point, None, flags)
        except OSError as e:
            if e.errno != errno.ENOENT:   # ENOENT: covered by a later mount, unreachable anyway
                failures.append(f"{point}: {e.strerror}")
    return failures


def _drop_privileges(libc: _Libc) -> str | dict:
    """No capabilities now or after any exec (bounding set empty, securebits locked), no_new_privs.
    Returns "none", or the capability sets still held when the kernel refused a step."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last_cap = int(f.read())
        libc.prctl(PR_SET_SECUREBITS, SECUREBITS_LOCKED_NOROOT)
        for cap in range(last_cap + 1):
            libc.prctl(PR_CAPBSET_DROP, cap)
        libc.prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    except OSError:   # no CAP_SETPCAP: the bounding set stays, but no_new_privs stops exec regaining it
        pass
    libc.clear_capabilities()
    libc.prctl(PR_SET_NO_NEW_PRIVS, 1)
    with open("/proc/self/status") as f:
        caps = {k: v.strip() for k, v in (line.split(":", 1) for line in f if line.startswith("Cap"))}
    return "none" if all(int(v, 16) == 0 for k, v in caps.items() if k != "CapAmb") else caps


# ----------------------------------------------------------------------------------------------
# Guest: the audit hook, then the program (the only stage where model-written code runs)
# ----------------------------------------------------------------------------------------------

_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
_READ_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_EXTRA_READ_ROOTS = ("/usr/share/zoneinfo",)
_PATH_EVENTS = frozenset({
    "os.symlink", "os.mkdir", "os.rmdir", "os.remove", "os.rename", "os.link", "os.chmod", "os.chown",
    "os.truncate", "os.utime", "os.chflags", "os.lchflags", "os.setxattr", "os.removexattr",
    "os.mkfifo", "os.mknod"})
_LIST_EVENTS = frozenset({"os.listdir", "os.scandir", "os.getxattr", "os.listxattr"})
_EXEC_EVENTS = frozenset({"os.exec", "os.posix_spawn", "os.spawn", "os.system", "subprocess.Popen",
                          "os.startfile", "pty.spawn"})
_FORK_EVENTS = frozenset({"os.fork", "os.forkpty"})
_BLOCKED_MODULES = frozenset({
    "ctypes", "_ctypes", "cffi", "_cffi_backend", "_posixsubprocess", "_xxsubinterpreters",
    "_interpreters", "_xxinterpchannels", "_interpchannels", "_interpqueues", "_testcapi",
    "_testinternalcapi", "_testmultiphase", "_testsinglephase", "_testimportmultiple"})
_INTROSPECTION_EVENTS = frozenset({"gc.get_objects", "gc.get_referrers", "gc.get_referents"})
_GUARDED_EVENTS = (_PATH_EVENTS | _LIST_EVENTS | _EXEC_EVENTS | _FORK_EVENTS | _INTROSPECTION_EVENTS
                   | {"open", "os.kill", "os.killpg", "import", "object.__setattr__"})


def _guest_main(config_fd: int, result_fd: int) -> None:
    """Read the run's config, guard the interpreter, run the program, write the result record."""
    config = json.loads(_read_fd(config_fd))
    os.close(config_fd)
    nonce = config.pop("nonce")
    if config["limits"]["site_packages"]:
        import site
        sys.path.extend(p for p in site.getsitepackages() if os.path.isdir(p))
    if config["limits"]["audit_hook"]:
        _install_guard(config["work"], _read_roots(), config["allow_fork"], config["allow_kill"])
    record = _run_user_code(config)
    record["status"] = _flush_output(record["status"])
    try:
        _write_record(result_fd, nonce, "result", record)
    finally:
        os._exit(0)


def _read_roots() -> tuple[str, ...]:
    paths = [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *sys.path,
             *_EXTRA_READ_ROOTS]
    return tuple(sorted({os.path.realpath(p) for p in paths if p and os.path.isabs(p)}))


def _resolve_path(path: str, cwd: str, lstat, readlink, islink) -> str:
    """Absolute path with symlinks resolved (like os.path.realpath, strict=False), built only from
    C-level calls passed in and str/list methods: rebinding os, posixpath or builtins cannot change it.
    (An error raised here propagates out of the audit hook, which denies the operation: fail closed.)"""
    pending = (path if path.startswith("/") else cwd + "/" + path).split("/")[::-1]
    resolved, links = [], 0
    while pending:
        part = pending.pop()
        if part == "" or part == ".":
            continue
        if part == "..":
            resolved = resolved[:-1]
            continue
        candidate = "/" + "/".join(resolved + [part])
        try:
            is_link = islink(lstat(candidate).st_mode)
        except OSError:
            is_link = False
        if not is_link:
            resolved = resolved + [part]
            continue
        links += 1
        if links > 40:
            raise PermissionError("sandbox: too many symbolic links")
        target = readlink(candidate)
        resolved = [] if target.startswith("/") else resolved
        pending = pending + target.split("/")[::-1]
    return "/" + "/".join(resolved)


def _install_guard(work: str, read_roots: tuple[str, ...], allow_fork: bool, allow_kill: bool) -> None:
    """PEP 578 audit hook: file access only in `work` (reads also under `read_roots`), no sockets,
    no exec, no ctypes; no fork when nothing else bounds the process count.

    Everything the hook uses (its policy, C-level os functions, even builtins like `any`) is bound
    in default arguments when it is made, so a program that rebinds module globals or builtins
    (e.g. through a traceback's frame) does not change what the hook checks."""
    import stat
    policy = (os.path.realpath(work), read_roots, allow_fork, allow_kill, _WRITE_FLAGS, _READ_DEVICES)
    events = (_GUARDED_EVENTS, _LIST_EVENTS, _PATH_EVENTS, _EXEC_EVENTS, _FORK_EVENTS,
              _INTROSPECTION_EVENTS, _BLOCKED_MODULES)
    calls = (_resolve_path, os.lstat, os.readlink, stat.S_ISLNK, os.stat, stat.S_ISDIR, os.getcwd,
             os.fspath, bytes.decode, os.getpid)

    def _sandbox_guard(event, args, policy=policy, events=events, calls=calls, any=any,
                       hasattr=hasattr, isinstance=isinstance, len=len, repr=repr, str=str,
                       bytes=bytes, int=int, OSError=OSError, PermissionError=PermissionError,
                       ImportError=ImportError):
        guarded, lists, paths_ev, execs, forks, introspection, blocked = events
        if event not in guarded and not event.startswith("socket."):
            return
        work, roots, fork, kill, write_flags, devices = policy
        resolve_path, lstat, readlink, islink, stat_, isdir_mode, getcwd, fspath, decode, getpid = calls

        def resolve(path, base=None):
            path = fspath(path)
            path = decode(path, "utf-8", "surrogateescape") if isinstance(path, bytes) else path
            return resolve_path(path, base or getcwd(), lstat, readlink, islink)

        def inside(path, tops):
            return any(path == t or path.startswith(t + "/") for t in tops)

        def is_dir(path):
            try:
                return isdir_mode(stat_(path).st_mode)
            except OSError:
                return False

        def deny(what=""):
            raise PermissionError(f"sandbox: {event} {what} is not allowed")

        if event == "open":
            path, mode, flags = args
            if path is None or isinstance(path, int):
                return
            p = resolve(path)
            writing = (flags or 0) & write_flags or any(c in (mode or "") for c in "wax+")
            if inside(p, (work,)) or p in ("/dev/null", "/dev/zero", "/dev/full"):
                return
            if not writing and (p in devices or inside(p, roots)) and not is_dir(p):
                return
            deny(repr(p))
        elif event in lists:
            target = args[0] if args and args[0] is not None else "."
            if not isinstance(target, int) and not inside(resolve(target), (work, *roots)):
                deny(repr(target))
        elif event in paths_ev:
            paths = [a for a in args if isinstance(a, (str, bytes)) or hasattr(a, "__fspath__")]
            if event == "os.symlink":   # the link target counts from the link's own directory
                paths = [resolve(paths[0], resolve(paths[1]).rpartition("/")[0] or "/"), paths[1]]
            for a in paths:
                if not inside(resolve(a), (work,)):
                    deny(repr(a))
        elif event.startswith("socket."):
            raise PermissionError("sandbox: network access is disabled")
        elif event in execs or (event in forks and not fork) or event in introspection:
            deny()                # introspection (gc) is the way to reach this hook's function
        elif event in ("os.kill", "os.killpg") and not kill and args[0] not in (0, getpid()):
            deny(str(args[0]))
        elif event == "import" and str(args[0]).partition(".")[0] in blocked:
            raise ImportError(f"sandbox: importing {args[0]} is not allowed")
        elif event == "object.__setattr__" and len(args) > 1 and args[1] == "__code__":
            deny("__code__")

    for name in ("ctypes", "_ctypes"):
        sys.modules.pop(name, None)
    sys.addaudithook(_sandbox_guard)


def _run_user_code(config: dict) -> dict:
    """Compile and run the program (and the assert tests); never raises."""
    try:
        program = compile(config["code"], "<solution>", "exec")
    except BaseException as e:
        return {"status": "compile_error", "detail": _name_of(e)}
    io_mode = config["mode"] == "io"
    module = type(sys)("__main__" if io_mode else "solution")
    sys.modules["__main__"] = module if io_mode else type(sys)("__main__")  # hide the harness
    if not io_mode:
        sys.modules["solution"] = module
    status, detail = _exec(program, module.__dict__, exit_ok=io_mode)
    if io_mode or status != "ok":
        return {"status": status, "detail": detail}
    passed = []
    for snippet in config["tests"]:
        try:
            test = compile(snippet, "<test>", "exec")
        except BaseException:
            passed.append(False)
            continue
        passed.append(_exec(test, module.__dict__, exit_ok=False)[0] == "ok")
    return {"status": "ok", "passed": passed}


def _exec(code, namespace: dict, exit_ok: bool) -> tuple[str, str]:
    """("ok" | "exception" | "memory" | "output_limit", detail) for exec(code, namespace)."""
    import errno
    try:
        exec(code, namespace)
        return "ok", ""
    except SystemExit as e:
        if exit_ok and e.code in (None, 0):
            return "ok", "exit 0"
        return "exception", "SystemExit"
    except MemoryError:
        return "memory", "MemoryError"
    except OSError as e:
        return ("output_limit" if e.errno == errno.EFBIG else "exception"), _name_of(e)
    except BaseException as e:
        return "exception", _name_of(e)


def _flush_output(status: str) -> str:
    """Flush the program's stdout/stderr; a write past the size limit turns the status into that."""
    import errno
    for stream in (sys.stdout, sys.stderr, sys.__stdout__, sys.__stderr__):
        try:
            stream.flush()
        except OSError as e:
            if e.errno == errno.EFBIG:
                return "output_limit"
        except BaseException:
            pass
    return status


def _name_of(e: BaseException) -> str:
    try:
        return type(e).__name__
    except BaseException:
        return "?"


if __name__ == "__main__":
    _command = sys.argv[1] if len(sys.argv) > 1 else ""
    if _command == "supervise":
        _supervise()
    elif _command == "setup":
        _setup_main(int(sys.argv[2]), int(sys.argv[3]))
    elif _command == "guest":
        _guest_main(int(sys.argv[2]), int(sys.argv[3]))
    else:
        sys.exit("usage: code.py supervise|setup|guest ...")
