"""What recording costs serving: request latency through `eagle3 serve --record`'s proxy vs vLLM
directly, the same prompts, interleaved, in one run.

    .venv/bin/python benchmarks/serve_recording.py --draft smollm2-135m-instruct --prompts 20 \
        --out docs/results/serve_recording.json
    .venv/bin/python benchmarks/serve_recording.py --prompts 3 --max-new-tokens 16   # smoke

One vLLM server with the head (eager, the recipe's vllm settings); the recording proxy in front of
it records every proxied request (redaction, acceptance counters read around lone requests, spool
every 2 s; the upload is off: it runs in a background thread and never on the request path). Each
MT-bench question is sent twice per mode, non-streamed (latency to the last byte) and streamed
(time to the first content chunk and to the last byte), direct and proxied in alternating order
per prompt, one request at a time. Prints p50/p95 of each, their proxied/direct ratios, and the
median (and interquartile range) of the per-prompt proxied/direct ratio, the paired figure that
prompt length and output length do not move.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile (q in [0, 100]) of a non-empty list."""
    s = sorted(xs)
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def timed_request(client, body: dict, stream: bool) -> dict:
    """{total, first} seconds of one chat completion (first: first content chunk, streamed only)."""
    t0 = time.perf_counter()
    if not stream:
        r = client.post("/v1/chat/completions", json=body)
        r.raise_for_status()
        return {"total": time.perf_counter() - t0, "first": None}
    first = None
    with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if first is None and line.startswith("data:") and '"content"' in line:
                first = time.perf_counter() - t0
    return {"total": time.perf_counter() - t0, "first": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--draft", default="smollm2-135m-instruct", help="a head dir or shipped name")
    ap.add_argument("--config", default="configs/smollm2-135m.yaml")
    ap.add_argument("--profile", default="full")
    ap.add_argument("--prompts", type=int, default=20, help="MT-bench questions (first turn)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--out", default=None, help="JSON report")
    ap.add_argument("overrides", nargs="*")
    args = ap.parse_args()

    import httpx

    from eagle3.config import load_recipe
    from eagle3.data.sources import load_eval_prompts
    from eagle3.eval.provenance import provenance
    from eagle3.heads import resolve_draft
    from eagle3.ops.procs import free_port_block
    from eagle3.ops.vllm_server import spec_from_recipe, start_vllm
    from eagle3.serve.recorder import Recorder, RecordingServer, build_app

    spool = tempfile.mkdtemp(prefix="serve-recording-spool-")
    recipe = load_recipe(args.config, [f"traffic.spool_dir={spool}", *args.overrides], args.profile)
    prompts = load_eval_prompts("mt_bench", args.prompts, recipe)
    draft = str(resolve_draft(args.draft))
    say = lambda m: print(m, flush=True)  # noqa: E731
    srv = start_vllm(spec_from_recipe(recipe, draft), "bench-recording", None,
                     recipe.vllm.start_timeout, say)  # fmt: skip
    rec = Recorder(recipe, "bench-recording", "bench", s=None).start()
    proxy = RecordingServer(build_app(srv.url, rec), free_port_block(1)).start()
    clients = {
        "direct": httpx.Client(base_url=srv.url, timeout=600),
        "recorded": httpx.Client(base_url=proxy.url, timeout=600),
    }
    served = clients["direct"].get("/v1/models").json()["data"][0]["id"]
    times = {(m, s): [] for m in clients for s in (False, True)}
    try:
        warm = {"model": served, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 8}
        for c in clients.values():  # warm-up, outside the measurement
            timed_request(c, warm, False)
        for i, p in enumerate(prompts):
            text = p.turns[0]
            body = {"model": served, "messages": [{"role": "user", "content": text}],
                    "max_tokens": args.max_new_tokens, "temperature": 0}  # fmt: skip
            order = list(clients) if i % 2 == 0 else list(clients)[::-1]
            for stream in (False, True):
                for mode in order:
                    times[mode, stream].append(timed_request(clients[mode], body, stream))
            say(f"prompt {i + 1}/{len(prompts)}")
    finally:
        proxy.stop()
        rec.stop()
        srv.stop()

    rows = {}
    for (mode, stream), xs in times.items():
        tot = [x["total"] for x in xs]
        key = f"{mode}/{'stream' if stream else 'json'}"
        rows[key] = {"p50": percentile(tot, 50), "p95": percentile(tot, 95), "n": len(tot),
                     "mean": statistics.fmean(tot)}  # fmt: skip
        if stream:
            first = [x["first"] for x in xs if x["first"] is not None]
            rows[key]["first_p50"] = percentile(first, 50) if first else None
            rows[key]["first_p95"] = percentile(first, 95) if first else None
    ratios = {}
    for kind, stream in (("json", False), ("stream", True)):
        d, r = rows[f"direct/{kind}"], rows[f"recorded/{kind}"]
        ratios[kind] = {"p50": r["p50"] / d["p50"], "p95": r["p95"] / d["p95"]}
        if kind == "stream" and d.get("first_p50"):
            ratios[kind]["first_p50"] = r["first_p50"] / d["first_p50"]
        # Paired: the same prompt, back to back, so prompt length and output drop out.
        pairs = sorted(
            a["total"] / b["total"]
            for a, b in zip(times["recorded", stream], times["direct", stream], strict=True)
        )
        ratios[kind]["paired_median"] = statistics.median(pairs)
        ratios[kind]["paired_iqr"] = [percentile(pairs, 25), percentile(pairs, 75)]
    print(f"\n{'mode':<18}{'p50 s':>9}{'p95 s':>9}{'first p50':>11}{'first p95':>11}")
    for key, v in rows.items():
        f50, f95 = v.get("first_p50"), v.get("first_p95")
        print(f"{key:<18}{v['p50']:>9.3f}{v['p95']:>9.3f}"
              f"{(f'{f50:.3f}' if f50 else '-'):>11}{(f'{f95:.3f}' if f95 else '-'):>11}")  # fmt: skip
    print(f"recorded / direct: {json.dumps(ratios, indent=None)}")
    print(f"recorder: {rec.counts}")
    report = {
        "rows": rows,
        "ratios": ratios,
        "recorder": rec.counts,
        "max_new_tokens": args.max_new_tokens,
        "prompts": len(prompts),
        "draft": args.draft,
        "provenance": provenance(
            recipe,
            {"recipe": args.config, "overrides": list(args.overrides)},
            args.prompts,
            ["mt_bench"],
            list(clients),
        ),  # fmt: skip
        "command": " ".join(["benchmarks/serve_recording.py", *sys.argv[1:]]),
    }
    if args.out:
        from eagle3.io import write_json_atomic

        write_json_atomic(Path(args.out), report)
        print(f"report: {args.out}")


if __name__ == "__main__":
    main()
