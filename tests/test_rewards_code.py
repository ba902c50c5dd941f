"""The sandboxed code reward: parsing, scoring, and hostile programs that must be contained.

Each hostile program is followed in its batch by a distinct correct program, which must still score 1.
The hostile batch runs twice: with every layer (namespaces, cgroup, audit hook) and with the fallback
layers only (rlimits + audit hook). A third batch turns the audit hook off to check that the kernel
layers hold on their own (root on Linux only).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ahazero.rewards import code as code_mod
from ahazero.rewards.code import SandboxLimits, code_reward, extract_code, parse_tests, same_output

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

GOOD = "def add(a, b):\n    return a + b\n"
ADD_TESTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 4"]
SECRET_NAME, SECRET_VALUE = "AHAZERO_TEST_SECRET", "hunter2-do-not-leak"


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


def good(i: int) -> str:
    """A correct program, made distinct (identical programs in a batch run only once)."""
    return GOOD + f"# correct program {i}\n"


def kernel_layers_available() -> bool:
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        return False
    probe = ["unshare", "--net", "--mount", "--pid", "--ipc", "--uts", "--fork", "true"]
    return subprocess.run(probe, capture_output=True).returncode == 0


# ----------------------------------------------------------------------------------------------
# Parsing (pure functions)
# ----------------------------------------------------------------------------------------------

def test_extract_code_prefers_last_python_block_inside_answer():
    text = ("<think>```python\nx = 1\n```</think><answer>\n```python\ny = 2\n```\n"
            "```python\nz = 3\n```\n</answer>")
    assert extract_code(text) == "z = 3\n"


def test_extract_code_forms():
    assert extract_code("```py\na = 1\n```") == "a = 1\n"
    assert extract_code("```\nb = 2\n```") == "b = 2\n"
    assert extract_code("```bash\nrm -rf /\n```") is None
    assert extract_code("```bash\nls\n```\n```\nc = 3\n```") == "c = 3\n"
    assert extract_code("<answer>\n    def f():\n        return 1\n</answer>") == "def f():\n    return 1\n"
    assert extract_code("no code at all") is None
    assert extract_code("```python\nunclosed = 1\n") is None
    assert extract_code("<answer>   </answer>") is None


def test_parse_tests_formats():
    assert parse_tests(["assert f(1) == 2"]) == ("asserts", ["assert f(1) == 2"])
    assert parse_tests(json.dumps(["assert f(1) == 2"])) == ("asserts", ["assert f(1) == 2"])
    assert parse_tests("import math\nassert f(1) == 2\nassert f(2) == 3\n") == (
        "asserts", ["import math\nassert f(1) == 2", "import math\nassert f(2) == 3"])
    assert parse_tests([{"input": "1 2\n", "output": "3\n"}]) == ("io", [["1 2\n", "3\n"]])
    assert parse_tests('{"inputs": ["1\\n", "2\\n"], "outputs": ["1\\n", "4\\n"]}') == (
        "io", [["1\n", "1\n"], ["2\n", "4\n"]])
    for unusable in (None, "", "   ", [], {}, 3, {"inputs": ["1"], "outputs": []}, [1, 2]):
        assert parse_tests(unusable) is None, unusable


def test_same_output_ignores_trailing_whitespace_only():
    assert same_output("3\n", "3")
    assert same_output("a  \r\nb\n\n\n", "a\nb")
    assert not same_output("3\n", "4\n")
    assert not same_output(" 3", "3")
    assert not same_output("a\n\nb", "a\nb")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_extract_code_never_raises(text):
    got = extract_code(text)
    assert got is None or (isinstance(got, str) and got.strip())


@settings(max_examples=200, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(),
                    lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.sampled_from(["input", "output", "inputs", "outputs", "x"]),
                                      inner, max_size=4), max_leaves=12))
def test_parse_tests_never_raises(value):
    for candidate in (value, json.dumps(value)):
        got = parse_tests(candidate)
        assert got is None or (got[0] in ("asserts", "io") and len(got[1]) > 0)


def test_resolve_path_matches_realpath(tmp_path):
    root = str(tmp_path)
    os.makedirs(f"{root}/a/b")
    os.symlink("..", f"{root}/a/b/up")
    os.symlink("/etc", f"{root}/etc")
    os.symlink("b/up/b", f"{root}/a/lnk")
    os.symlink("loop2", f"{root}/loop1")
    os.symlink("loop1", f"{root}/loop2")
    import stat
    for path in ("a/b/up/../x", "etc/passwd", "a/lnk/up/up/zz", "./a//b/./", "/", "../../..",
                 "missing/../a", "a/b/up/b/up", f"{root}/a/lnk"):
        got = code_mod._resolve_path(path, root, os.lstat, os.readlink, stat.S_ISLNK)
        assert got == os.path.realpath(os.path.join(root, path)), path
    with pytest.raises(PermissionError):   # a symlink loop is denied, not followed forever
        code_mod._resolve_path("loop1", root, os.lstat, os.readlink, stat.S_ISLNK)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="timeout"):
        SandboxLimits(timeout=0)


# ----------------------------------------------------------------------------------------------
# Scoring correct and partially correct programs
# ----------------------------------------------------------------------------------------------

def test_scores_fraction_of_asserts_passed():
    f = code_reward(timeout=2.0)
    partial = "def add(a, b):\n    return abs(a) + b\n"          # fails add(-1, 1) only
    wrong = "def add(a, b):\n    return a - b\n"
    completions = [fenced(GOOD), fenced(partial), fenced(wrong), "I cannot write code.",
                   [{"role": "assistant", "content": f"<answer>\n{GOOD}</answer>"}], fenced(GOOD)]
    tests = [ADD_TESTS] * 5 + [None]
    scores = f(prompts=["p"] * 6, completions=completions, tests=tests)
    assert scores[:5] == pytest.approx([1.0, 2 / 3, 0.0, 0.0, 1.0])
    assert scores[5] is None                                  # no tests: not applicable
    assert f.last_stats == {"timeouts": 0, "errors": 0, "no_code": 1, "scored": 5}
    assert f.__name__ == "code_reward"


def test_io_cases_and_source_string_tests():
    f = code_reward("cases", timeout=1.0)
    summer = "a, b = map(int, input().split())\nprint(a + b)\n"
    multiplier = "a, b = map(int, input().split())\nprint(a * b)\n"
    stalls = "n = int(input())\nwhile n == 2:\n    pass\nprint(n)\n"   # second case never ends
    io_tests = [{"input": "1 2\n", "output": "3\n"}, {"input": "2 2\n", "output": "4\n"}]
    source_tests = "from math import isclose\nassert isclose(add(0.1, 0.2), 0.3)\nassert add(1, 1) == 2\n"
    scores = f(completions=[fenced(summer), fenced(multiplier), fenced(stalls), fenced(GOOD)],
               cases=[io_tests, io_tests, json.dumps({"inputs": ["1\n", "2\n"], "outputs": ["1", "2"]}),
                      source_tests])
    assert scores == pytest.approx([1.0, 0.5, 0.0, 1.0])
    assert f.last_stats["timeouts"] == 1 and f.last_results[2]["outcome"] == "timeout"


def test_program_sees_only_a_minimal_environment_in_a_fresh_workdir(monkeypatch):
    monkeypatch.setenv(SECRET_NAME, SECRET_VALUE)
    before = set(os.listdir(tempfile.gettempdir()))
    program = ("import os, tempfile\n"
               "home = os.environ['HOME']\n"
               "assert os.getcwd() == home == os.environ['TMPDIR'] == tempfile.gettempdir()\n"
               "assert os.listdir('.') == []\n"
               "open('scratch.txt', 'w').write('fine here')\n"
               "print(' '.join(sorted(os.environ)))\n")
    expected = " ".join(sorted(code_mod._sandbox_env("/w")))
    f = code_reward(timeout=2.0)
    assert f(completions=[fenced(program)], tests=[[{"input": "", "output": expected}]]) == [1.0]
    leftovers = {d for d in set(os.listdir(tempfile.gettempdir())) - before if d.startswith("ahazero-sbx-")}
    assert not leftovers, "temporary working directories must be removed"


def test_missing_tests_column_warns_once_and_scores_none():
    f = code_reward("unit_tests")
    with pytest.warns(UserWarning, match="unit_tests"):
        assert f(completions=[fenced(GOOD)], tests=[ADD_TESTS]) == [None]
    import warnings
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert f(completions=[fenced(GOOD)]) == [None]
    assert caught == [], "the missing column is reported once, not every step"


def test_sandbox_failure_scores_zero_and_counts_errors(monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("supervisor died")
    monkeypatch.setattr(code_mod, "run_jobs", broken)
    f = code_reward()
    with pytest.warns(UserWarning, match="supervisor died"):
        scores = f(completions=[fenced(GOOD), "no code"], tests=[ADD_TESTS, ADD_TESTS])
    assert scores == [0.0, 0.0]
    assert f.last_stats["errors"] == 2


# ----------------------------------------------------------------------------------------------
# Hostile programs
# ----------------------------------------------------------------------------------------------

class Listener:
    """A TCP listener on 127.0.0.1 that records every connection it accepts."""

    def __init__(self):
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.settimeout(0.1)
        self.port = self.sock.getsockname()[1]
        self.connections: list[bytes] = []
        self.running = True
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while self.running:
            try:
                conn, _ = self.sock.accept()
            except (socket.timeout, OSError):
                continue
            conn.settimeout(1.0)
            try:
                self.connections.append(conn.recv(100) or b"<connected>")
            except OSError:
                self.connections.append(b"<connected>")
            conn.close()

    def close(self):
        self.running = False
        self.thread.join(2)
        self.sock.close()


def hostile_programs(outside: str, port: int, victim: int) -> dict[str, str]:
    """name -> program. Each attacks, then defines a correct `add`: only containment scores it 0."""
    o = repr(outside)
    attacks = {
        "infinite_loop": "while True:\n    pass",
        "sleep_forever": "import time\ntime.sleep(3600)",
        "allocate_10gb": "blob = bytearray(10 * 1024 ** 3)",
        "fork_bomb": "import os\nwhile True:\n    os.fork()",
        "fork_bomb_setsid": ("import os\nwhile True:\n    try:\n        if os.fork() == 0:\n"
                             "            os.setsid()\n    except OSError:\n        pass"),
        "daemon_child": ("import os, time\nif os.fork() == 0:\n    time.sleep(120)\n    os._exit(0)\n"
                         "raise SystemExit(3)"),
        "write_outside": f"open(os.path.join({o}, 'open.txt'), 'w').write('escaped')",
        "create_outside": f"os.open(os.path.join({o}, 'osopen.txt'), os.O_CREAT | os.O_WRONLY)",
        "symlink_escape": f"os.symlink({o}, 'link')\nopen('link/symlink.txt', 'w').write('escaped')",
        "shell_escape": ("import subprocess\n"
                         f"subprocess.run(['sh', '-c', 'echo x > ' + os.path.join({o}, 'sh.txt')])"),
        "ctypes_escape": "import ctypes\nctypes.CDLL(None).unshare(0)",
        "rebind_builtins": (f"target = os.path.join({o}, 'builtins.txt')\n"
                            "import builtins\nbuiltins.any = lambda it: True\n"
                            "open(target, 'w').write('escaped')"),
        "rebind_guard_globals": (   # reach the harness's globals through the hook's traceback
            f"target = os.path.join({o}, 'globals.txt')\n"
            "try:\n    open('/etc/hostname')\nexcept PermissionError as e:\n    tb = e.__traceback__\n"
            "    while tb.tb_next:\n        tb = tb.tb_next\n    g = tb.tb_frame.f_globals\n"
            "    for k in [k for k in g if type(g[k]) in (frozenset, tuple)]:\n"
            "        g[k] = type(g[k])()\n"
            "import posixpath\nposixpath.realpath = os.path.realpath = lambda p, **k: os.getcwd()\n"
            "open(target, 'w').write('escaped')"),
        "socket_to_localhost": (f"import socket\ns = socket.create_connection(('127.0.0.1', {port}), 2)\n"
                                "s.sendall(b'leaked')"),
        "read_env_secret": f"secret = os.environ[{SECRET_NAME!r}]",
        "read_trainer_environ": (f"data = open('/proc/{os.getpid()}/environ', 'rb').read()\n"
                                 f"assert {SECRET_NAME.encode()!r} in data"),
        "read_etc_shadow": "open('/etc/shadow').read()",
        "kill_other_process": f"import signal\nos.kill({victim}, signal.SIGKILL)",
        "print_100mb": "print('x' * 100_000_000)",
        "stderr_100mb": "import sys\nsys.stderr.write('e' * 100_000_000)\nsys.stderr.flush()",
        "file_200mb": "open('big.bin', 'wb').write(b'0' * 200_000_000)",
        "recursion": "def f():\n    return f()\nf()",
        "exit_early": "os._exit(0)",
        "fake_result_record": ("for fd in range(3, 12):\n    try:\n"
                               "        os.write(fd, b'\\n0 result {\"status\": \"ok\", "
                               "\"passed\": [true, true, true]}\\n')\n"
                               "    except OSError:\n        pass\nos._exit(0)"),
        "syntax_error": "def broken(:\n    pass",
    }
    programs = {name: "import os\n" + attack + "\n" + GOOD for name, attack in attacks.items()}
    programs["exit_inside_function"] = "import sys\ndef add(a, b):\n    sys.exit(0)\n"   # not a pass
    return programs


EXPECTED_TIMEOUTS = {"infinite_loop", "sleep_forever", "fork_bomb_setsid"}
EXPECTED_OK_BUT_WRONG = {"exit_inside_function"}       # runs fine, every test fails: score 0, no error


def sandbox_processes() -> list[str]:
    """Command lines of processes still running code.py (none may outlive a batch)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if code_mod._THIS_FILE in cmd:
            found.append(f"{pid}: {cmd}")
    return found


@pytest.fixture(scope="module", params=["all_layers", "fallback_layers"])
def hostile_batch(request, tmp_path_factory):
    outside = tmp_path_factory.mktemp("outside_sandbox")
    listener = Listener()
    victim = subprocess.Popen(["sleep", "300"])
    os.environ[SECRET_NAME] = SECRET_VALUE
    programs = hostile_programs(str(outside), listener.port, victim.pid)
    names = list(programs)
    completions = []
    for i, name in enumerate(names):
        completions += [fenced(programs[name]), fenced(good(i))]
    f = code_reward(timeout=1.0, namespaces=request.param == "all_layers")
    try:
        scores = f(completions=completions, tests=[ADD_TESTS] * len(completions))
        victim_alive = victim.poll() is None
        yield {"mode": request.param, "names": names, "scores": scores, "results": f.last_results,
               "stats": f.last_stats,
               "isolation": f.last_isolation, "outside": outside, "connections": list(listener.connections),
               "victim_alive": victim_alive, "leftover_processes": sandbox_processes()}
    finally:
        del os.environ[SECRET_NAME]
        victim.kill()
        victim.wait()
        listener.close()


def test_hostile_programs_score_zero(hostile_batch):
    hostile = {n: hostile_batch["scores"][2 * i] for i, n in enumerate(hostile_batch["names"])}
    assert len(hostile) == 26
    assert {n: s for n, s in hostile.items() if s != 0.0} == {}


def test_correct_program_after_each_hostile_one_scores_one(hostile_batch):
    after = {n: hostile_batch["scores"][2 * i + 1] for i, n in enumerate(hostile_batch["names"])}
    assert {n: s for n, s in after.items() if s != 1.0} == {}


def test_timeouts_and_crashes_are_counted(hostile_batch):
    outcomes = {n: hostile_batch["results"][2 * i]["outcome"] for i, n in enumerate(hostile_batch["names"])}
    details = {n: hostile_batch["results"][2 * i]["detail"] for i, n in enumerate(hostile_batch["names"])}
    assert {n for n, o in outcomes.items() if o == "timeout"} == EXPECTED_TIMEOUTS, details
    assert {n for n, o in outcomes.items() if o == "ok"} == EXPECTED_OK_BUT_WRONG, details
    errors = set(outcomes) - EXPECTED_TIMEOUTS - EXPECTED_OK_BUT_WRONG
    assert hostile_batch["stats"] == {"timeouts": len(EXPECTED_TIMEOUTS), "errors": len(errors),
                                      "no_code": 0, "scored": 2 * len(outcomes)}
    for name in ("print_100mb", "stderr_100mb", "file_200mb"):
        assert "output" in details[name], details[name]
    assert "memory" in details["allocate_10gb"]


def test_side_effects_are_contained(hostile_batch):
    assert list(hostile_batch["outside"].iterdir()) == [], "a program wrote outside its sandbox"
    assert hostile_batch["connections"] == [], "a program reached the 127.0.0.1 listener"
    assert hostile_batch["victim_alive"], "a program killed a process outside the sandbox"
    assert hostile_batch["leftover_processes"] == [], "a sandboxed process outlived its run"


def test_isolation_report_names_the_layers_in_force(hostile_batch):
    isolation = hostile_batch["isolation"]
    if hostile_batch["mode"] == "fallback_layers":
        assert isolation["namespaces"] == [] and isolation["network"] == "audit hook"
        assert isolation["processes"] in ("RLIMIT_NPROC", "fork blocked by audit hook")
        assert os.geteuid() != 0 or isolation["capabilities"] == "none"
        return
    if not kernel_layers_available():
        pytest.skip("needs root and working namespaces")
    assert isolation["namespaces"] == ["ipc", "mount", "net", "pid", "uts"]
    assert isolation["network"] == "network namespace"
    assert isolation["capabilities"] == "none"
    if code_mod._pids_cgroup_base() is not None:
        assert isolation["processes"] == "pids cgroup"
    assert isolation["filesystem"]["not_readonly"] == []
    assert isolation["filesystem"]["dev"] == "minimal"


# ----------------------------------------------------------------------------------------------
# The kernel layers alone (audit hook off): root on Linux with namespaces
# ----------------------------------------------------------------------------------------------

def test_kernel_layers_hold_without_the_audit_hook(tmp_path):
    if not kernel_layers_available():
        pytest.skip("needs root and working namespaces (unshare --net --mount --pid)")
    f = code_reward(timeout=1.0, audit_hook=False)
    listener = Listener()
    victim = subprocess.Popen(["sleep", "300"])
    o = repr(str(tmp_path))
    system_file = f"/etc/ahazero-sandbox-test-{os.getpid()}"
    hostile = {
        "create_outside": f"os.open(os.path.join({o}, 'k1.txt'), os.O_CREAT | os.O_WRONLY)",
        "symlink_escape": f"os.symlink({o}, 'link')\nopen('link/k2.txt', 'w').write('x')",
        "shell_escape": f"import subprocess\nsubprocess.run(['sh', '-c', 'echo x > {tmp_path}/k3.txt'])\n"
                        f"assert os.path.exists(os.path.join({o}, 'k3.txt'))",
        "write_system_dir": f"open({system_file!r}, 'w')",
        "socket": f"import socket\nsocket.create_connection(('127.0.0.1', {listener.port}), 2).sendall(b'x')",
        "fork_bomb": "while True:\n    os.fork()",
        "kill_other_process": f"os.kill({victim.pid}, 9)",
        "raw_disk": ("opened = 0\nfor name in os.listdir('/sys/block'):\n    try:\n"
                     "        open('/dev/' + name, 'rb')\n        opened += 1\n    except OSError:\n"
                     "        pass\nassert opened"),
    }
    in_root = sorted({p.split("/")[2] for p in code_mod._interpreter_paths() if p.startswith("/root/")})
    positive = {   # each scores 1 only if the layer is in force
        "no_capabilities": "caps = dict(l.split(':') for l in open('/proc/self/status')\n"
                           "            if l.startswith('Cap'))\n"
                           "assert all(int(caps[k], 16) == 0 for k in ('CapEff', 'CapPrm', 'CapBnd'))",
        "home_dirs_hidden": f"assert sorted(os.listdir('/root')) == {in_root!r}",
        "minimal_dev": "assert set(os.listdir('/dev')) <= {'null', 'zero', 'full', 'random', 'urandom', "
                       "'fd', 'stdin', 'stdout', 'stderr'}",
        "own_pid_namespace": "assert os.getpid() == 1",
    }
    programs = {n: "import os\n" + a + "\n" + GOOD for n, a in {**hostile, **positive}.items()}
    try:
        scores = f(completions=[fenced(p) for p in programs.values()], tests=[ADD_TESTS] * len(programs))
        victim_alive = victim.poll() is None
        wrote_system_file = os.path.exists(system_file)
    finally:
        victim.kill()
        victim.wait()
        listener.close()
        if os.path.exists(system_file):
            os.remove(system_file)
    got = dict(zip(programs, scores))
    details = dict(zip(programs, (r["detail"] for r in f.last_results)))
    assert {n: got[n] for n in hostile} == dict.fromkeys(hostile, 0.0), details
    assert {n: got[n] for n in positive} == dict.fromkeys(positive, 1.0), details
    assert list(tmp_path.iterdir()) == [] and not wrote_system_file
    assert listener.connections == [] and victim_alive
    assert sandbox_processes() == []


def test_signal_exit_codes_are_read_as_crashes():
    fds = {name: code_mod._memfd(name, b"") for name in ("stdout", "stderr", "result")}
    try:
        crashed = code_mod._classify("asserts", False, 128 + signal.SIGSEGV, fds, "n" * 32, 100)
        cpu = code_mod._classify("io", False, -signal.SIGXCPU, fds, "n" * 32, 100)
    finally:
        for fd in fds.values():
            os.close(fd)
    assert crashed["outcome"] == "error" and cpu["outcome"] == "timeout"


def test_stragglers_are_found_by_their_unique_home():
    marker = f"HOME=/nonexistent/ahazero-sbx-{os.getpid()}-{id(object())}"
    straggler = subprocess.Popen(["sleep", "60"], env={"HOME": marker.split("=", 1)[1]})
    bystander = subprocess.Popen(["sleep", "60"], env={"HOME": marker.split("=", 1)[1] + "x"})
    try:
        assert code_mod._kill_by_environ(marker.encode()) == 1
        assert straggler.wait(5) == -signal.SIGKILL
        assert bystander.poll() is None
    finally:
        for p in (straggler, bystander):
            p.kill()
            p.wait()


NON_ROOT_SCRIPT = """
import importlib.util, json, os, sys
spec = importlib.util.spec_from_file_location("sandbox_code", sys.argv[1])
m = importlib.util.module_from_spec(spec); sys.modules["sandbox_code"] = m; spec.loader.exec_module(m)
good = "def add(a, b):\\n    return a + b\\n"
programs = [
    "import os\\nwhile True:\\n    os.fork()\\n" + good,
    "import os, time\\nif os.fork() == 0:\\n    os.setsid()\\n    time.sleep(120)\\n" + good,
    "import socket\\nsocket.create_connection(('127.0.0.1', 9))\\n" + good,
    good,
]
f = m.code_reward(timeout=1.0, workers=1)   # concurrent runs would share one RLIMIT_NPROC budget
scores = f(completions=["```python\\n" + p + "```" for p in programs], tests=[["assert add(1, 2) == 3"]] * 4)
mine = [p for p in os.listdir("/proc") if p.isdigit() and int(p) != os.getpid()]
live = []
for p in mine:
    try:
        if os.stat("/proc/" + p).st_uid == os.getuid() and "zombie" not in open("/proc/%s/status" % p).read():
            live.append(p)
    except OSError:
        pass
print(json.dumps({"scores": scores, "details": [r["detail"] for r in f.last_results],
                  "isolation": f.last_isolation, "live": live}))
"""


def readable_by_others(path: str) -> bool:
    parts = os.path.abspath(path).split("/")
    dirs = ["/" + "/".join(parts[1:i]) for i in range(1, len(parts))]
    return os.stat(path).st_mode & 0o004 and all(os.stat(d).st_mode & 0o001 for d in dirs)


def test_non_root_fallback_contains_fork_bombs_and_stragglers():
    """As an ordinary user (uid 65534) nothing but rlimits and the hook are available."""
    python = shutil.which("python3", path="/usr/local/bin:/usr/bin:/bin")
    if os.geteuid() != 0 or not shutil.which("setpriv") or not python:
        pytest.skip("needs root, setpriv and a system python3")
    version = subprocess.run([python, "-c", "import sys; print(sys.version_info >= (3, 10))"],
                             capture_output=True, text=True).stdout.strip()
    if version != "True" or not readable_by_others(code_mod._THIS_FILE) or not readable_by_others(python):
        pytest.skip("the system python3 must be >= 3.10 and code.py readable by other users")
    run = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, "-I", "-c",
                          NON_ROOT_SCRIPT, code_mod._THIS_FILE], capture_output=True, text=True,
                         cwd="/", env={"PATH": "/usr/bin:/bin"}, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.strip().splitlines()[-1])
    assert got["isolation"]["processes"] == "RLIMIT_NPROC" and got["isolation"]["namespaces"] == []
    assert got["scores"] == [0.0, 1.0, 0.0, 1.0], got["details"]   # the daemon's parent did pass
    assert "BlockingIOError" in got["details"][0]                    # the fork bomb hit RLIMIT_NPROC
    assert got["live"] == [], "the setsid daemon outlived its run"
