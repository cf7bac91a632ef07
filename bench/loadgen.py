"""Bounded load from a separate process: wrk (Debian's package) driven by a generated Lua script.

wrk is C and cheap on the CPU, so on a 2-core machine most of the CPU is left to the server
being measured; the same script and the same connection count go to both servers.

A workload is one method and path, with either
- `paths`: a list of paths, taken in turn (v1 lookups of different addresses),
- `bodies`: a list of bodies, taken in turn (lookups of different batches), or
- `body_template`: a body in which `UNIQ__` becomes a value unique to each request
  (requestToken and store-invite: a fresh address and client secret every time).
"""

from __future__ import annotations

import json
import secrets
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

UNIQUE_MARK = "UNIQ__"


@dataclass
class Workload:
    name: str
    method: str
    path: str
    headers: dict[str, str] = field(default_factory=dict)
    paths: list[str] | None = None
    bodies: list[str] | None = None
    body_template: str | None = None
    sends_mail: bool = False


@dataclass
class LoadResult:
    requests: int  # responses received
    ok: int  # 2xx/3xx responses
    errors: int  # non-2xx/3xx, connect/read/write errors, timeouts
    seconds: float
    p50_ms: float
    p99_ms: float

    @property
    def rps(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0


def _lua_string(value: str) -> str:
    return json.dumps(value)  # a JSON string literal is a valid Lua string literal for our ASCII data


_SCRIPT = """
wrk.method = {method}
wrk.headers["Content-Type"] = "application/json"
{header_lines}
local default_path = {path}
local run_id = {run_id}
local template = {template}
local paths_file = {paths_file}
local bodies_file = {bodies_file}
local paths, bodies = {{}}, {{}}
local counter, idx = 0, 0
local nthreads = 0

function setup(thread)
  nthreads = nthreads + 1
  thread:set("tid", nthreads)
end

function init(args)
  if paths_file then for line in io.lines(paths_file) do paths[#paths + 1] = line end end
  if bodies_file then for line in io.lines(bodies_file) do bodies[#bodies + 1] = line end end
  idx = tid * 7919  -- threads start at different places in the lists
end

function request()
  counter = counter + 1
  idx = idx + 1
  local path = default_path
  if #paths > 0 then path = paths[(idx % #paths) + 1] end
  local body = nil
  if #bodies > 0 then
    body = bodies[(idx % #bodies) + 1]
  elseif template then
    body = string.gsub(template, "UNIQ__", run_id .. "t" .. tid .. "n" .. counter)
  end
  return wrk.format(nil, path, nil, body)
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, \\"read\\": %d, \\"write\\": %d, " ..
    "\\"status\\": %d, \\"timeout\\": %d, \\"p50_us\\": %d, \\"p99_us\\": %d}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(99)))
end
"""


def wrk_path() -> str:
    path = shutil.which("wrk")
    if path is None:
        raise RuntimeError("wrk is not installed: apt-get install wrk (Debian's package)")
    return path


def run_wrk(
    base_url: str, load: Workload, *, seconds: float, connections: int, threads: int = 2, timeout_s: int = 60
) -> LoadResult:
    with tempfile.TemporaryDirectory(prefix="bench-wrk-") as tmp:
        tmpdir = Path(tmp)
        paths_file = bodies_file = None
        if load.paths:
            paths_file = tmpdir / "paths.txt"
            paths_file.write_text("\n".join(load.paths) + "\n")
        if load.bodies:
            bodies_file = tmpdir / "bodies.txt"
            bodies_file.write_text("\n".join(load.bodies) + "\n")
        script = _SCRIPT.format(
            method=_lua_string(load.method),
            header_lines="\n".join(
                f"wrk.headers[{_lua_string(k)}] = {_lua_string(v)}" for k, v in load.headers.items()
            ),
            path=_lua_string(load.path),
            run_id=_lua_string(secrets.token_hex(4)),
            template=_lua_string(load.body_template) if load.body_template else "nil",
            paths_file=_lua_string(str(paths_file)) if paths_file else "nil",
            bodies_file=_lua_string(str(bodies_file)) if bodies_file else "nil",
        )
        script_file = tmpdir / "load.lua"
        script_file.write_text(script)
        cmd = [
            wrk_path(),
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            f"--timeout={timeout_s}s",
            "-s",
            str(script_file),
            base_url,
        ]
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + timeout_s + 30)
    line = next((ln for ln in out.stdout.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]} {out.stderr[-2000:]}")
    data = json.loads(line[len("WRKJSON ") :])
    failed = data["status"] + data["connect"] + data["read"] + data["write"] + data["timeout"]
    return LoadResult(
        requests=data["requests"],
        ok=max(0, data["requests"] - data["status"]),
        errors=failed,
        seconds=data["duration_us"] / 1e6,
        p50_ms=data["p50_us"] / 1000,
        p99_ms=data["p99_us"] / 1000,
    )
