"""The pure parts of ``aoi bench service --cpu`` (:mod:`benchmarks.bench_cpu`): reading a process's CPU time, per
thread, and splitting it by thread role and by request stage from a ``py-spy record --format raw`` profile.

CPU time is the kernel's user + system accounting (psutil reads ``/proc``), exact to a clock tick per thread. The
stage split is a sampling estimate: a thread's CPU time is shared out in proportion to its samples per stage.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = [
    "CpuReading",
    "CpuTally",
    "Sample",
    "dump_names",
    "parse_dump",
    "parse_raw",
    "py_spy",
    "read_cpu",
    "record",
    "stage_of",
    "stage_split",
    "thread_role",
    "thread_split",
    "unplaced",
]

RUNTIME = "inference runtime (native threads)"
EXITED = "threads that exited"
NATIVE_LOOP = "event loop, native (uvloop, httptools)"


@dataclass(frozen=True)
class CpuReading:
    """User + system seconds of a process (every thread, those that exited included) and of each live thread."""

    total_s: float
    threads: Mapping[int, float]


def read_cpu(pid: int | None = None) -> CpuReading:
    """The CPU time of process ``pid`` (None: this one) and of each of its threads, by OS thread id."""
    import psutil

    proc = psutil.Process(pid)
    threads = {int(t.id): float(t.user_time) + float(t.system_time) for t in proc.threads()}
    times = proc.cpu_times()  # after the threads: the total holds at least what they were read at
    return CpuReading(float(times.user) + float(times.system), threads)


@dataclass
class CpuTally:
    """CPU time of one process summed over load slices, with the images it answered in them."""

    cpu_s: float = 0.0
    images: int = 0
    thread_s: dict[int, float] = field(default_factory=dict)
    model_s: float = 0.0  # of cpu_s, inside the backend's call (the service's aoi_backend_call_cpu_seconds_total)

    def add(self, before: CpuReading, after: CpuReading, images: int, model_s: float = 0.0) -> None:
        """One slice: the readings around it, the images answered in it (a thread born in between counts from 0)
        and the CPU seconds it spent inside the backend's call."""
        self.cpu_s += after.total_s - before.total_s
        self.images += images
        self.model_s += model_s
        for tid, s in after.threads.items():
            self.thread_s[tid] = self.thread_s.get(tid, 0.0) + s - before.threads.get(tid, 0.0)

    def merge(self, other: CpuTally) -> None:
        """Add another tally's slices to this one."""
        self.cpu_s += other.cpu_s
        self.images += other.images
        self.model_s += other.model_s
        for tid, s in other.thread_s.items():
            self.thread_s[tid] = self.thread_s.get(tid, 0.0) + s

    def ms_per_image(self) -> float:
        """Milliseconds of CPU per image (NaN before any image)."""
        return self.cpu_s * 1e3 / self.images if self.images > 0 else float("nan")

    def model_ms_per_image(self) -> float:
        """Milliseconds of CPU per image inside the backend's call (NaN before any image)."""
        return self.model_s * 1e3 / self.images if self.images > 0 else float("nan")

    def thread_ms(self) -> dict[int, float]:
        """CPU ms per image of each thread by OS thread id; what the process spent beyond its live threads (threads
        that exited, e.g. a pool worker retired) is under id -1."""
        if self.images <= 0:
            return {}
        out = {tid: s * 1e3 / self.images for tid, s in self.thread_s.items()}
        rest = self.ms_per_image() - sum(out.values())
        if rest > 1e-6:
            out[-1] = rest
        return out


_ROLES = (
    ("MainThread", "event loop (HTTP, JSON, small decodes, results)"),
    ("aoi-infer", "aoi-infer threads (rows, backend call, NMS)"),
    ("aoi-decode", "decode pool"),
    ("records", "records writer"),
    ("aoi-outbox", "signals"),
    ("aoi-signals", "signals"),
)


def thread_role(name: str | None) -> str:
    """What a thread of the service does, from its Python name (None: a thread with no Python frames, i.e. one of
    the inference runtime's own)."""
    if name is None:
        return RUNTIME
    return next((role for prefix, role in _ROLES if name.startswith(prefix)), "other Python threads")


def thread_split(per_thread: Mapping[int, float], names: Mapping[int, str]) -> dict[str, float]:
    """CPU ms per image by thread role; ``names``: the Python threads' names by OS thread id."""
    out: dict[str, float] = {}
    for tid, ms in per_thread.items():
        role = EXITED if tid == -1 else thread_role(names.get(tid))
        out[role] = out.get(role, 0.0) + ms
    return _largest_first(out)


_DUMP_THREAD = re.compile(r'^Thread (\d+) \([^)]*\): "(.*)"$', re.MULTILINE)


def parse_dump(text: str) -> dict[int, str]:
    """Python thread names by OS thread id from ``py-spy dump`` output."""
    return {int(tid): name for tid, name in _DUMP_THREAD.findall(text)}


@dataclass(frozen=True)
class Sample:
    """One line of ``py-spy record --format raw --threads``: a thread, its stack (outermost first) and the count."""

    tid: int
    thread: str
    frames: tuple[tuple[str, str], ...]  # (function, file)
    count: int


_RAW_THREAD = re.compile(r"^thread \((\d+)\): (.*)$")
_FRAME = re.compile(r"^(.*) \((.*?)(?::\d+)?\)$")


def parse_raw(text: str) -> list[Sample]:
    """The samples of a raw (collapsed-stack) py-spy profile recorded with ``--threads``; other lines are skipped."""
    out = []
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        parts = stack.split(";")
        head = _RAW_THREAD.match(parts[0]) if parts else None
        if head is None or not count.isdigit():
            continue
        frames = []
        for part in parts[1:]:
            m = _FRAME.match(part)
            frames.append((m.group(1), m.group(2)) if m else (part, ""))
        out.append(Sample(int(head.group(1)), head.group(2), tuple(frames), int(count)))
    return out


# The innermost frame in the service's own code (service/cli/ aside) decides the stage; (path fragment, function
# fragment, stage), first match wins. Without such a frame, the innermost library frame does (_LIBRARY_STAGES).
_SERVICE_STAGES = (
    ("service/backends/", "", "inference"),
    ("service/core/preprocess.py", "decode", "decode"),
    ("service/core/frames.py", "decode", "decode"),
    ("service/core/preprocess.py", "", "preprocess (rows, letterbox)"),
    ("service/core/frames.py", "", "preprocess (rows, letterbox)"),
    ("service/core/postprocess.py", "", "postprocess (NMS, merge, verdict)"),
    ("service/inference/batching.py", "", "queue / hand-off / event loop"),
    ("service/inference/serving.py", "", "queue / hand-off / event loop"),
    ("service/records/", "", "records"),
    ("service/signals/", "", "signals"),
    ("service/inference/metrics.py", "", "metrics"),
    ("service/http/", "", "JSON / HTTP"),
    ("service/inference/", "", "pipeline (admission, results)"),
    ("service/", "", "other service code"),
)
_LIBRARY_STAGES = (
    (("uvicorn/", "starlette/", "fastapi/", "h11/", "httptools/", "anyio/", "pydantic", "json/", "multipart"),
     "JSON / HTTP"),
    (("asyncio/", "selectors.py", "threading.py", "concurrent/", "queue.py"), "queue / hand-off / event loop"),
    (("prometheus_client/",), "metrics"),
    (("sqlite3/",), "records"),
)  # fmt: skip


def stage_of(frames: Iterable[tuple[str, str]]) -> str:
    """The request stage of one stack (outermost frame first)."""
    inner_first = list(frames)[::-1]
    at_entry = False
    for function, path in inner_first:
        if "service/cli/" in path:  # the entry point and the server's wrappers: what runs under them decides
            at_entry = True
            break
        for fragment, fn_fragment, stage in _SERVICE_STAGES:
            if fragment in path and fn_fragment in function:
                return stage
    for _, path in inner_first:
        for fragments, stage in _LIBRARY_STAGES:
            if any(f in path for f in fragments):
                return stage
    # nothing in Python under the entry point: the event loop's own native code (uvloop, httptools parsing)
    return NATIVE_LOOP if at_entry else "other"


def stage_split(
    samples: Iterable[Sample], per_thread: Mapping[int, float], names: Mapping[int, str]
) -> dict[str, float]:
    """CPU ms per image by stage: each thread's CPU (``per_thread``, ms per image by OS thread id) shared out over its
    samples' stages. A thread without samples is one of the runtime's native threads (no Python frames: its time is
    "inference") unless ``names`` (Python threads by id) knows it: a Python thread never seen busy is "unsampled"."""
    by_thread: dict[int, Counter[str]] = {}
    for s in samples:
        by_thread.setdefault(s.tid, Counter())[stage_of(s.frames)] += s.count
    out: dict[str, float] = {}
    for tid, ms in per_thread.items():
        stages = by_thread.get(tid)
        shares = {k: n / sum(stages.values()) for k, n in stages.items()} if stages else {
            EXITED if tid == -1 else "unsampled" if tid in names else "inference": 1.0}  # fmt: skip
        for stage, share in shares.items():
            out[stage] = out.get(stage, 0.0) + ms * share
    return _largest_first(out)


def unplaced(samples: Iterable[Sample], n: int = 5) -> list[tuple[str, float]]:
    """The ``n`` commonest innermost frames of the samples no stage rule placed ("other service code", "other"), as
    ("function (file)", share of all samples): what a new rule in ``_SERVICE_STAGES`` should name."""
    frames: Counter[str] = Counter()
    total = 0
    for s in samples:
        total += s.count
        if s.frames and stage_of(s.frames) in ("other service code", "other"):
            inner = next((f for f in reversed(s.frames) if "service/" in f[1]), s.frames[-1])
            frames[f"{inner[0]} ({_short_path(inner[1])})"] += s.count
    return [(k, v / total) for k, v in frames.most_common(n)] if total else []


def _short_path(path: str) -> str:
    """A profiled file without the machine's folders: from the service package, site-packages or the standard
    library on (the results are written to files others read)."""
    for marker in ("/service/", "/site-packages/", "/dist-packages/"):
        if marker in path:
            return path.rpartition(marker)[2]
    return re.sub(r"^.*/lib/python3(\.\d+)?/", "", path) if "/lib/python3" in path else path.rpartition("/")[2]


def _largest_first(values: Mapping[str, float]) -> dict[str, float]:
    return dict(sorted(values.items(), key=lambda kv: -kv[1]))


def py_spy() -> str | None:
    """The ``py-spy`` executable (beside this Python's, else on PATH), or None."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def record(exe: str, pid: int, seconds: int, out: Path) -> subprocess.Popen[bytes]:
    """Start ``py-spy record`` of ``pid`` for ``seconds`` at 100 Hz, raw format, OS thread ids, full file names,
    without pausing the process (its CPU is not the service's: it runs as its own process)."""
    cmd = [exe, "record", "--pid", str(pid), "--duration", str(seconds), "--rate", "100", "--format", "raw"]
    cmd += ["--threads", "--full-filenames", "--nonblocking", "--output", str(out)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def dump_names(exe: str, pid: int) -> dict[int, str]:
    """The service's Python thread names by OS thread id (``py-spy dump``); empty when it cannot be read."""
    try:
        done = subprocess.run([exe, "dump", "--pid", str(pid), "--nonblocking"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {}
    return parse_dump(done.stdout.decode(errors="replace"))
