"""Serving benchmark: our OpenAI-compatible server vs transformers serve, without and with continuous batching.

Same local model folder, same chat prompts, same ``max_tokens``, greedy, streaming.

Each server runs as a subprocess on a free loopback port (its own process group, killed with this script),
one server at a time; after a warm-up round, each concurrency level runs N streaming clients at once, each
sending ``--requests-per-client`` requests back to back (``tests/serve_load.py``). Per level: aggregate
completion tok/s (completion tokens / wall time of the level), p50/p95 request latency and time to first token,
completion token counts (``usage.completion_tokens`` where the server sends it, else counted with the
tokenizer) and finish reasons; greedy texts are compared across servers. Targets: ours at 8 clients / ours at
1 client >= 3x, ours / each peer > 1x at every level.

Servers run one after the other, so the ratios are only as good as the machine is steady: each server's
entry records the load average before and after it. On a busy CPU, two OpenMP threads per server can be far
slower than one (``--server-threads 1``). The prompts repeat across requests and levels: run our server
without its completion cache (no ``--cache``), or the numbers measure the cache, not generation.

The model folder is ``workbench.load(model)`` saved with ``save_pretrained`` (fp32) under
``$DAERT_CACHE/serve/<model>`` and served offline (``HF_HUB_OFFLINE=1``); ``transformers serve`` is pinned to it
(``transformers serve FOLDER``, the request ``model`` is the folder path; the script reads it from ``/v1/models``).

    .venv/bin/python experiments/bench_serve.py   # the committed results (levels 1 4 8 16, 3 requests
                                                  # per client, 64 tokens) -> experiments/results/bench_serve.json
    .venv/bin/python experiments/bench_serve.py --quick --out /tmp/bench_serve_quick.json   # a check
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import httpx
from provenance import ROOT, provenance, write_json  # experiments/ is the script's folder

sys.path.insert(0, str(ROOT / "tests"))
from serve_load import ClientResult, run_clients  # noqa: E402  (tests/serve_load.py)

BIN = Path(sys.executable).parent  # the venv's bin/ (not resolved: the venv python is a symlink)
HOST = "127.0.0.1"
DEFAULT_OUT = ROOT / "experiments" / "results" / "bench_serve.json"

# Chat prompts asking for long answers, so greedy replies run to max_tokens (64) rather than stop at EOS.
PROMPTS = [
    "Explain in detail how a steam engine works, step by step.",
    "Write a long story about a lighthouse keeper who finds a message in a bottle.",
    "Describe the water cycle in detail for a school science report.",
    "What were the main causes of the First World War? Explain each one.",
    "Write a detailed guide to planting a vegetable garden in spring.",
    "Explain how the human heart pumps blood through the body.",
    "Describe the history of the printing press and its effects on Europe.",
    "Write an essay about why reading books is important for children.",
    "Explain how photosynthesis works and why it matters for life on Earth.",
    "Give a detailed comparison of cats and dogs as pets.",
    "Describe a day in the life of a medieval blacksmith.",
    "Explain how airplanes stay in the air, covering lift, thrust and drag.",
    "Write a detailed recipe for baking bread at home, with every step.",
    "What are the benefits of regular exercise? Explain several of them in detail.",
    "Explain how a refrigerator keeps food cold, in detail.",
    "Explain how the internet works, from a web browser to a server and back.",
]

OURS_CMD = "{bin}/daert serve -m {model_dir} --host {host} --port {port}"
SERVER_NAMES = ("ours", "transformers", "transformers-cb")


# ----- server processes -----

_LIVE: list[ServerProcess] = []


def _child_setup() -> None:  # runs in the child between fork and exec
    os.setsid()  # own process group: stopped as a group, and Ctrl-C in the terminal reaches only us
    with contextlib.suppress(Exception):  # Linux: the server dies with us even if we are SIGKILLed
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class ServerFailed(RuntimeError):
    pass


class ServerProcess:
    """A server subprocess: started in its own process group, ready when ``/health`` (or ``/v1/models``)
    answers 200, stopped with SIGTERM to the group then SIGKILL."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_path: Path, port: int):
        self.name, self.cmd, self.env, self.log_path, self.port = name, cmd, env, log_path, port
        self.base_url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float) -> float:
        t0 = time.perf_counter()
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(self.cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=self.env, preexec_fn=_child_setup)
        _LIVE.append(self)
        while True:
            if self.proc.poll() is not None:
                raise ServerFailed(f"exited with code {self.proc.returncode} during startup; log: {self.log_tail()}")
            for path in ("/health", "/v1/models"):
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(self.base_url + path, timeout=2).status_code == 200:
                        return time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                raise ServerFailed(f"not ready after {timeout:.0f} s; log: {self.log_tail()}")
            time.sleep(0.5)

    def model_id(self, fallback: str) -> str:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError):
            r = httpx.get(self.base_url + "/v1/models", timeout=10)
            if r.status_code == 200:
                return r.json()["data"][0]["id"]
        return fallback

    def log_tail(self, n: int = 15) -> str:
        try:
            lines = self.log_path.read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return " | ".join(line.strip() for line in lines[-n:] if line.strip())

    def stop(self) -> None:
        proc = self.proc
        if proc is None:
            return
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=15)
        with contextlib.suppress(ProcessLookupError, PermissionError):  # anything the server left in its group
            os.killpg(proc.pid, signal.SIGKILL)
        if self in _LIVE:
            _LIVE.remove(self)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def stop_all() -> None:
    for server in list(_LIVE):
        with contextlib.suppress(Exception):
            server.stop()


def _on_signal(signum, _frame):
    raise SystemExit(128 + signum)  # unwinds through the finally blocks that stop the servers


# ----- the servers under test -----

@dataclass
class ServerSpec:
    name: str
    cmd: list[str]
    unavailable: str | None = None  # why it cannot run, when it cannot


def server_specs(args, model_dir: Path) -> list[ServerSpec]:
    specs = []
    for name in args.servers:
        if name == "ours":
            fields = {"bin": BIN, "model_dir": model_dir, "host": HOST, "port": "{port}"}
            cmd = shlex.split(args.ours_cmd.format(**fields))
            reason, help_text = ours_unavailable(cmd)
            if args.server_threads and "--threads" in help_text and "--threads" not in cmd:
                cmd += ["--threads", str(args.server_threads)]  # ours sets its threads itself
            specs.append(ServerSpec(name, cmd, reason))
        else:
            cmd = [str(BIN / "transformers"), "serve", str(model_dir), "--host", HOST, "--port", "{port}",
                   "--device", args.device, "--dtype", "auto", "--log-level", "warning"]
            if name == "transformers-cb":
                cmd.append("--continuous-batching")
                if args.cb_num_blocks:
                    cmd += ["--cb-num-blocks", str(args.cb_num_blocks)]
            missing = None if (BIN / "transformers").exists() else f"{BIN / 'transformers'} not found"
            specs.append(ServerSpec(name, cmd, missing))
    return specs


def ours_unavailable(cmd: list[str]) -> tuple[str | None, str]:
    """Why our server cannot start (None when ``<cmd[:2]> --help`` succeeds), and that help text."""
    exe = Path(cmd[0])
    if not exe.exists():
        return f"{exe} not found", ""
    try:
        r = subprocess.run([*cmd[:2], "--help"], capture_output=True, text=True, timeout=120,
                           stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"`{shlex.join(cmd[:2])} --help` failed: {e}", ""
    if r.returncode != 0:
        err = [line for line in (r.stderr or r.stdout).strip().splitlines() if line.strip()]
        return f"`{shlex.join(cmd[:2])} --help` exited {r.returncode}: {err[-1] if err else 'no output'}", ""
    return None, r.stdout


def export_model(name: str, out: Path | None) -> Path:
    """The model folder every server loads: ``workbench.load(name)`` (fp32, CPU) saved with save_pretrained."""
    if out is None:
        from workbench.paths import cache_dir

        out = cache_dir() / "serve" / name
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        return out
    import workbench

    model, tok = workbench.load(name, device="cpu", dtype="float32", progress=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out.exists():  # a partial folder from an interrupted export
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return out


# ----- statistics -----

def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (numpy's default), None for no data."""
    if not xs:
        return None
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def level_stats(results: list[ClientResult], concurrency: int, max_tokens: int) -> dict:
    ok = [r for r in results if r.ok]
    wall = max(r.end for r in results) - min(r.start for r in results)
    tokens = [r.tokens for r in ok]
    lat = [r.latency for r in ok]
    ttft = [r.ttft for r in ok if r.ttft is not None]
    return {
        "concurrency": concurrency, "requests": len(results), "errors": len(results) - len(ok),
        "error_examples": sorted({r.error for r in results if not r.ok})[:3],
        "wall_s": wall, "completion_tokens": sum(tokens),
        "tok_s": sum(tokens) / wall if wall > 0 else None,
        "latency_p50_s": percentile(lat, 50), "latency_p95_s": percentile(lat, 95),
        "ttft_p50_s": percentile(ttft, 50), "ttft_p95_s": percentile(ttft, 95),
        "tokens_min": min(tokens, default=None), "tokens_max": max(tokens, default=None),
        "tokens_mean": sum(tokens) / len(tokens) if tokens else None,
        "requests_at_max_tokens": sum(t == max_tokens for t in tokens),
        "all_at_max_tokens": bool(ok) and all(t == max_tokens for t in tokens),
        "token_source": ("usage" if all(r.usage_tokens is not None for r in ok) else "counted") if ok else None,
        "finish_reasons": dict(Counter(str(r.finish_reason) for r in ok)),
    }


# ----- running one server -----

def bench_server(spec: ServerSpec, args, model_dir: Path, logs: Path, count_tokens) -> dict:
    entry: dict = {"available": spec.unavailable is None, "command": None, "reason": spec.unavailable}
    if spec.unavailable is not None:
        return entry
    port = free_port()
    cmd = [c.replace("{port}", str(port)) for c in spec.cmd]
    entry["command"] = shlex.join(cmd)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "PYTHONUNBUFFERED": "1"}
    if args.server_threads:
        env.update(OMP_NUM_THREADS=str(args.server_threads), MKL_NUM_THREADS=str(args.server_threads))
    server = ServerProcess(spec.name, cmd, env, logs / f"{spec.name}.log", port)
    texts: dict[str, list[str]] = {}
    entry["loadavg_before"] = os.getloadavg()  # the CPU is shared: a busy machine shows here
    with server:
        try:
            entry["startup_s"] = server.start(args.startup_timeout)
        except ServerFailed as e:
            entry.update(available=False, reason=f"failed to start: {e}")
            return entry
        model = args.request_model or server.model_id(str(model_dir))
        entry["model_id"] = model
        print(f"[{spec.name}] ready in {entry['startup_s']:.1f} s on port {port}, model {model!r}", flush=True)

        def load(concurrency: int, max_tokens: int, rpc: int) -> list[ClientResult]:
            return asyncio.run(run_clients(server.base_url, model, PROMPTS, concurrency, max_tokens,
                                           api_key=args.api_key, requests_per_client=rpc, temperature=0.0,
                                           timeout=args.request_timeout, count_tokens=count_tokens))

        warm = load(max(args.levels), min(8, args.max_tokens), 1)
        warm_errors = sorted({r.error for r in warm if not r.ok})
        entry["warmup"] = {"concurrency": max(args.levels), "errors": len(warm) - sum(r.ok for r in warm),
                           "error_examples": warm_errors[:3]}
        if not any(r.ok for r in warm):
            entry.update(available=False, reason=f"every warm-up request failed: {warm_errors[0]}; "
                                                 f"log: {server.log_tail()}")
            return entry
        entry["levels"] = []
        for c in args.levels:
            results = load(c, args.max_tokens, args.requests_per_client)
            row = level_stats(results, c, args.max_tokens)
            entry["levels"].append(row)
            for r in results:
                if r.ok:
                    texts.setdefault(r.prompt, []).append(r.text)
            print(f"[{spec.name}] {c:>3} clients: {fmt(row['tok_s'], 7, 1)} tok/s, latency p50 "
                  f"{fmt(row['latency_p50_s'], 6, 2)} s, ttft p50 {fmt(row['ttft_p50_s'], 6, 3)} s, "
                  f"tokens {row['tokens_min']}-{row['tokens_max']}, errors {row['errors']}", flush=True)
        if server.proc is not None and server.proc.poll() is not None:
            entry["exited_during_run"] = f"code {server.proc.returncode}; log: {server.log_tail()}"
        entry["loadavg_after"] = os.getloadavg()
    entry["texts"] = texts  # removed before writing; used for the greedy comparison
    return entry


# ----- ratios and targets -----

def tok_s(entry: dict, level: int) -> float | None:
    for row in entry.get("levels") or []:
        if row["concurrency"] == level:
            return row["tok_s"]
    return None


def ratios_and_targets(servers: dict, levels: list[int]) -> tuple[dict, list[dict]]:
    ratios: dict = {}
    targets: list[dict] = []
    ours = servers.get("ours")
    ours_ok = bool(ours and ours["available"] and ours.get("levels"))
    why_not = ("ours not in --servers" if ours is None else
               f"ours unavailable: {ours['reason']}" if not ours_ok else None)

    for name, entry in servers.items():  # every server's own scaling, for context
        a, b = tok_s(entry, 8), tok_s(entry, 1)
        if a and b:
            ratios[f"{name}_8_over_1"] = a / b

    t = {"name": "ours 8 clients / ours 1 client", "target": ">= 3", "measured": None, "met": None}
    if why_not:
        t["note"] = f"not measured: {why_not}"
    elif 1 not in levels or 8 not in levels:
        t["note"] = "not measured: --levels lacks 1 or 8"
    else:
        a, b = tok_s(ours, 8), tok_s(ours, 1)
        if a and b:
            t.update(measured=a / b, met=a / b >= 3, note=f"{a:.1f} / {b:.1f} tok/s")
        else:
            t["note"] = "not measured: no tokens at 1 or 8 clients"
    targets.append(t)

    for peer, entry in servers.items():
        if peer == "ours":
            continue
        for c in levels:
            t = {"name": f"ours / {peer} at {c} clients", "target": "> 1", "measured": None, "met": None}
            a, b = (tok_s(ours, c) if ours_ok else None), tok_s(entry, c)
            if why_not:
                t["note"] = f"not measured: {why_not}"
            elif not entry["available"]:
                t["note"] = f"not measured: {peer} unavailable: {entry['reason']}"
            elif a and b:
                ratios[f"ours_over_{peer}_at_{c}"] = a / b
                t.update(measured=a / b, met=a / b > 1, note=f"{a:.1f} / {b:.1f} tok/s")
            else:
                t["note"] = "not measured: no tokens at this level"
            targets.append(t)
    return ratios, targets


def greedy_comparison(servers: dict) -> dict:
    """Per server: prompts whose greedy text varies between its requests (batching changes the numerics),
    and agreement of its first text per prompt with the reference server's (ours, else the first peer)."""
    texts = {n: e.pop("texts") for n, e in servers.items() if "texts" in e}
    out: dict = {"reference": None, "servers": {}}
    if not texts:
        return out
    ref = "ours" if "ours" in texts else next(iter(texts))
    out["reference"] = ref
    for name, by_prompt in texts.items():
        common = [p for p in by_prompt if p in texts[ref]]
        out["servers"][name] = {
            "prompts": len(by_prompt),
            "prompts_with_varying_text": sum(len(set(v)) > 1 for v in by_prompt.values()),
            "prompts_compared_with_reference": len(common),
            "prompts_equal_to_reference": sum(by_prompt[p][0] == texts[ref][p][0] for p in common),
        }
    return out


# ----- report -----

def fmt(x, width: int, digits: int) -> str:
    return f"{x:>{width}.{digits}f}" if isinstance(x, (int, float)) else f"{'-':>{width}}"


def print_report(out: dict) -> None:
    print(f"\nmodel {out['model']} ({out['model_dir']}), max_tokens {out['max_tokens']}, "
          f"{out['requests_per_client']} requests per client, greedy, streaming")
    for name, e in out["servers"].items():
        if not e["available"]:
            print(f"  {name}: UNAVAILABLE: {e['reason']}")
    head = (f"{'server':>16} {'clients':>7} {'tok/s':>8} {'lat p50':>8} {'lat p95':>8} {'ttft p50':>9} "
            f"{'ttft p95':>9} {'tokens':>9} {'at max':>7} {'errors':>6}")
    print(head)
    for c in out["levels"]:
        for name, e in out["servers"].items():
            row = next((r for r in e.get("levels") or [] if r["concurrency"] == c), None)
            if row is None:
                continue
            toks = f"{row['tokens_min']}-{row['tokens_max']}"
            print(f"{name:>16} {c:>7} {fmt(row['tok_s'], 8, 1)} {fmt(row['latency_p50_s'], 8, 2)} "
                  f"{fmt(row['latency_p95_s'], 8, 2)} {fmt(row['ttft_p50_s'], 9, 3)} "
                  f"{fmt(row['ttft_p95_s'], 9, 3)} {toks:>9} "
                  f"{row['requests_at_max_tokens']:>3}/{row['requests'] - row['errors']:<3} {row['errors']:>6}")
    g = out["greedy"]
    for name, s in g["servers"].items():
        print(f"  greedy {name}: {s['prompts_equal_to_reference']}/{s['prompts_compared_with_reference']} "
              f"prompts equal to {g['reference']}, {s['prompts_with_varying_text']}/{s['prompts']} prompts "
              f"vary across its requests")
    for k, v in out["ratios"].items():
        print(f"  ratio {k}: {v:.2f}x")
    for t in out["targets"]:
        status = "NOT MEASURED" if t["met"] is None else "MET" if t["met"] else "MISSED"
        measured = f"{t['measured']:.2f}x" if t["measured"] is not None else ""
        print(f"  target {t['name']} {t['target']}: {status} {measured} ({t.get('note', '')})")


# ----- main -----

def run(args) -> dict:
    model_dir = export_model(args.model, args.model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)

    def count_tokens(text: str) -> int:  # only when a server sends no usage
        return len(tok(text, add_special_tokens=False)["input_ids"])

    servers: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench_serve_") as tmp:
        logs = Path(args.logs) if args.logs else Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        for spec in server_specs(args, model_dir):
            servers[spec.name] = bench_server(spec, args, model_dir, logs, count_tokens)
            if not servers[spec.name]["available"]:
                print(f"[{spec.name}] unavailable: {servers[spec.name]['reason']}", flush=True)
    greedy = greedy_comparison(servers)
    ratios, targets = ratios_and_targets(servers, args.levels)
    return {"model": args.model, "model_dir": str(model_dir), "dtype": "float32", "device": args.device,
            "max_tokens": args.max_tokens, "levels": args.levels, "requests_per_client": args.requests_per_client,
            "temperature": 0.0, "streaming": True, "quick": args.quick, "prompts": PROMPTS,
            "server_threads": args.server_threads, "cb_num_blocks": args.cb_num_blocks or None,
            "cpu_count": os.cpu_count(), "servers": servers, "greedy": greedy, "ratios": ratios,
            "targets": targets}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-m", "--model", default="smollm2-135m-instruct", help="workbench model to export and serve")
    ap.add_argument("--model-dir", type=Path, default=None,
                    help="model folder to serve (default $DAERT_CACHE/serve/<model>, exported if missing)")
    ap.add_argument("--levels", type=int, nargs="+", default=None, help="concurrency levels (default 1 4 8 16)")
    ap.add_argument("--requests-per-client", type=int, default=None, help="requests each client sends (default 3)")
    ap.add_argument("--max-tokens", type=int, default=None, help="max_tokens per request (default 64)")
    ap.add_argument("--servers", nargs="+", choices=SERVER_NAMES, default=list(SERVER_NAMES))
    ap.add_argument("--quick", action="store_true",
                    help="tiny check: levels 1 8, 1 request per client, 16 tokens (explicit options win)")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="results JSON ('-' for none)")
    ap.add_argument("--ours-cmd", default=OURS_CMD,
                    help="our server's command; {bin} {model_dir} {host} {port} are filled in")
    ap.add_argument("--request-model", default=None,
                    help="the request's model field (default: the first id of /v1/models)")
    ap.add_argument("--api-key", default=None)
    ap.add_argument("--device", default="cpu", help="transformers serve --device (default cpu)")
    ap.add_argument("--cb-num-blocks", type=int, default=64,
                    help="transformers serve --cb-num-blocks (default 64 blocks of 256 tokens; 0: its default, "
                         "which on CPU reserves 60%% of free RAM for the KV cache)")
    ap.add_argument("--server-threads", type=int, default=None, help="OMP/MKL threads of each server (and ours' --threads when it has one)")
    ap.add_argument("--startup-timeout", type=float, default=300.0)
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--logs", default=None, help="keep the server logs in this folder")
    args = ap.parse_args()
    quick = {"levels": [1, 8], "requests_per_client": 1, "max_tokens": 16}
    full = {"levels": [1, 4, 8, 16], "requests_per_client": 3, "max_tokens": 64}
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    out_path = None if args.out == "-" else Path(args.out)

    signal.signal(signal.SIGTERM, _on_signal)
    signal.signal(signal.SIGHUP, _on_signal)
    try:
        out = run(args)
    except KeyboardInterrupt:
        print("interrupted: servers stopped, nothing written", file=sys.stderr)
        raise SystemExit(130) from None
    finally:
        stop_all()
    print_report(out)
    write_json(out_path, {**provenance(), **out})
    if out_path is not None:
        print(f"wrote {out_path}")


if __name__ == "__main__":
    main()
