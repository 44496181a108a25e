"""Load benchmark of server.py: N concurrent streaming clients, per drafter, per synthetic pair.

    python serve_benchmark.py [--family llama t5] [--drafter plain draft lookup] [--clients 1 4 8 16]
        [--requests 2] [--max-tokens 64] [--num-draft 5] [--mlx-lm] [--json FILE]

Each setting starts its own server (a subprocess), warms it up, then runs each client
count: every client sends `--requests` streamed completions one after another. Reports
requests per second, output tokens per second (all clients' tokens over the wall time),
time to first token (request sent to its first text) and inter-token latency (a
request's time from first to last text over its tokens after the first), p50 and p95.
One client runs each prompt once, in turns with main.py's own decoding of it in this
process (the `main.py` rows: no HTTP), so both share one stretch of the machine's time.
With --mlx-lm (needs `pip install mlx-lm`), the same load against `mlx_lm.server` on the
same Llama pair's Hugging Face folders with the same draft. Progress goes to stderr,
then a table and JSON.
"""

import cpu_blas  # noqa: F401  (binds MKL or OpenBLAS before MLX loads on Linux)

import json
import socket
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from importlib.util import find_spec
from pathlib import Path

import httpx2 as httpx  # the HTTP client the openai package uses
from tabulate import tabulate

import benchmark
import cli
import files

ROOT = Path(__file__).resolve().parent
PROMPTS = [
    "Return the number of items.",
    "Write the rows to the CSV file using the dialect given, quoting every field that needs it",
    "Create a new parser with the given options and a default formatter",
    "Decode the bytes using the codec registered for encoding.",
    "Raise an error when the value is not valid for this field of the dataclass.",
    "Join two paths.",
    "Sort the list in place.",
    "Open the URL and return its contents as bytes",
]
# mlx_lm.server run with this process's BLAS binding (MKL), like ours: the comparison is of servers.
MLX_LM_SERVER = "import cpu_blas, sys; from mlx_lm import server; sys.argv[0] = 'mlx_lm.server'; server.main()"


def build_parser():
    parser = cli.ArgumentParser(description="Load benchmark of server.py (and mlx_lm.server) with concurrent clients.")
    parser.add_argument("--family", nargs="+", choices=["llama", "t5", "gpt2"], default=["llama", "t5"],
                        help="synthetic pairs (benchmark.py's)")
    parser.add_argument("--drafter", nargs="+", choices=["plain", "draft", "lookup"], default=["plain", "draft", "lookup"],
                        help="plain decoding, the draft model, prompt lookup")
    parser.add_argument("--clients", nargs="+", type=int, default=[1, 4, 8, 16], help="concurrent clients")
    parser.add_argument("--requests", type=int, default=2, help="requests per client, one after another")
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens per request")
    parser.add_argument("--num-draft", type=int, default=5, help="the servers' num-draft")
    parser.add_argument("--max-batch", type=int, default=16, help="server.py's --max-batch")
    parser.add_argument("--layers", type=int, default=24, help="synthetic target's layers")
    parser.add_argument("--d-model", type=int, default=512, help="synthetic pair's width")
    parser.add_argument("--eps", type=float, default=benchmark.EPS, help="synthetic pair's disagreement")
    parser.add_argument("--mlx-lm", action="store_true", help="also run mlx_lm.server (Llama pair, draft) under the same load")
    parser.add_argument("--mlx-lm-clients", nargs="+", type=int, metavar="N",
                        help="client counts for mlx_lm.server (default: --clients)")
    parser.add_argument("--beside-long", type=int, metavar="TOKENS",
                        help="instead of the client counts: time to first token of a short request sent while a "
                             "prompt of TOKENS tokens is prefilled, against the short request alone")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE (after every setting)")
    return parser


def check(args):
    rules = [
        (min(args.clients) >= 1, "--clients must be at least 1"),
        (args.requests >= 1, "--requests must be at least 1"),
        (args.max_tokens >= 2, "--max-tokens must be at least 2"),
        (args.num_draft >= 1, "--num-draft must be at least 1"),
        (not args.mlx_lm or find_spec("mlx_lm") is not None, "--mlx-lm needs mlx-lm: pip install mlx-lm"),
    ]
    for ok, message in rules:
        if not ok:
            cli.fail(message)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(command, url, timeout=600):
    """Start a server subprocess; return it once `url`/health or /v1/models answers."""
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + timeout
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{command[1]} exited: {process.stderr.read()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                return process
        except httpx.TransportError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError(f"{command[1]} did not come up in {timeout} s")


def stop(process):
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()


def one_request(url, model, prompt, max_tokens):
    """Send one streamed completion; return (seconds to first text, seconds first to last text, tokens)."""
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}}
    sent = time.perf_counter()
    first = last = None
    tokens = 0
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=600) as reply:
        reply.raise_for_status()
        for line in reply.iter_lines():
            if not line.startswith("data:") or line.strip() == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                last = time.perf_counter()
                first = first or last
    if first is None:
        raise RuntimeError("a request returned no text")
    return first - sent, last - first, tokens


def load(url, model, clients, requests, max_tokens):
    """Run `clients` concurrent clients, each sending `requests` requests; return the measurements."""

    def client(n):
        return [one_request(url, model, PROMPTS[(n + i) % len(PROMPTS)], max_tokens) for i in range(requests)]

    began = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        results = [r for rs in pool.map(client, range(clients)) for r in rs]
    return summarise(results, clients, time.perf_counter() - began)


def beside_long(url, model, tokens, max_tokens=8, rounds=3):
    """Time to first token of a short request alone, and sent 0.2 s after a streamed prompt of
    `tokens` tokens ("a " repeated: one token each to the synthetic tokenizers), whose own time to
    first token is its prefill's; medians over `rounds`."""
    alone, beside, long_ttft = [], [], []
    for _ in range(rounds):
        alone.append(one_request(url, model, PROMPTS[0], max_tokens)[0])
        with ThreadPoolExecutor(2) as pool:
            long_reply = pool.submit(one_request, url, model, "a " * tokens, max_tokens)
            time.sleep(0.2)
            beside.append(one_request(url, model, PROMPTS[0], max_tokens)[:2])
            long_ttft.append(long_reply.result()[0])
    return {"clients": 2, "long_prompt_tokens": tokens, "short_ttft_alone": statistics.median(alone),
            "short_ttft_beside_long": statistics.median(ttft for ttft, _ in beside),
            "short_total_beside_long": statistics.median(ttft + rest for ttft, rest in beside),
            "long_ttft": statistics.median(long_ttft)}


def percentile(values, q):
    if len(values) < 2:
        return values[0] if values else None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def main_py(args, target, draft_flags):
    """main.py's own decoding of one prompt alone, in this process (its step_events on its loaded
    models: no HTTP, no queue), as a function of the prompt returning (seconds to the first token,
    seconds first to last, tokens): the reference for one client."""
    import mlx.core as mx

    import decoder
    import drafters
    import main as main_py_module
    import policy

    flags = ["--model", str(target), "--max-tokens", str(args.max_tokens), "--num-draft", str(args.num_draft)]
    if not draft_flags:
        flags.append("--regular-decode")
    elif draft_flags[0] == "--prompt-lookup":
        flags += draft_flags
    else:
        flags += ["--draft-model", draft_flags[1]]
    options = main_py_module.parse_args(flags)
    own_draft = not (options.regular_decode or options.prompt_lookup)
    loaded, draft, tokenizer = main_py_module.load_models(options.model, options.draft_model if own_draft else None)
    if options.prompt_lookup:
        draft = drafters.PromptLookupDrafter(options.ngram_max)
    chosen = policy.make_policy(options.draft_schedule, options.num_draft)

    def decode(prompt):
        mx.random.seed(0)
        stats = [decoder.Stats()]
        began = time.perf_counter()
        first = last = None
        for _ in main_py_module.step_events(options, loaded, draft, [tokenizer(prompt).input_ids], stats, chosen, [0]):
            last = time.perf_counter()
            first = first or last
        return first - began, last - first, stats[0].generated

    return decode


def summarise(results, clients, wall):
    """A row's measurements from (seconds to first text, seconds first to last, tokens) per request."""
    tokens = sum(r[2] for r in results)
    ttft = [r[0] for r in results]
    itl = [r[1] / (r[2] - 1) for r in results if r[2] > 1]
    return {
        "clients": clients, "requests": len(results), "seconds": wall, "tokens": tokens,
        "requests_per_second": len(results) / wall, "tokens_per_second": tokens / wall,
        "ttft_p50": percentile(ttft, 50), "ttft_p95": percentile(ttft, 95),
        "itl_p50": percentile(itl, 50), "itl_p95": percentile(itl, 95),
    }


def one_client_beside(reference, url, model, max_tokens):
    """One client against the server and main.py's own decoding, request by request in turns (the
    same prompts, the same stretch of time on a shared machine): (server row, main.py row)."""
    served, direct = [], []
    for prompt in PROMPTS:
        served.append(one_request(url, model, prompt, max_tokens))
        direct.append(reference(prompt))
    wall = lambda results: sum(r[0] + r[1] for r in results)  # noqa: E731  (each request's own time)
    return summarise(served, 1, wall(served)), summarise(direct, 1, wall(direct))


def settings(args):
    """(server, family, drafter, command builder) per setting to run."""
    for family in args.family:
        pair = benchmark.synthetic_pair(args.eps, args.layers, args.d_model, family)
        for drafter in args.drafter:
            flags = {"plain": [], "draft": ["--draft-model", str(pair["draft"])], "lookup": ["--prompt-lookup"]}[drafter]
            yield "main.py", family, drafter, pair["target"], flags
            yield "server.py", family, drafter, pair["target"].name, lambda port, flags=flags, pair=pair: [
                sys.executable, "server.py", "--model", str(pair["target"]), *flags, "--num-draft",
                str(args.num_draft), "--max-batch", str(args.max_batch), "--max-queue", "1024", "--port", str(port)]
        if args.mlx_lm and family == "llama":
            for drafter in [d for d in args.drafter if d in ("plain", "draft")]:
                flags = ["--draft-model", str(pair["hf_draft"]), "--num-draft-tokens", str(args.num_draft)] \
                    if drafter == "draft" else []
                yield "mlx_lm.server", family, drafter, str(pair["hf_target"]), lambda port, flags=flags, pair=pair: [
                    sys.executable, "-c", MLX_LM_SERVER, "--model", str(pair["hf_target"]), *flags,
                    "--port", str(port), "--max-tokens", str(args.max_tokens), "--temp", "0.0"]


def run(args):
    rows, reference = [], None
    for name, family, drafter, model, command in settings(args):
        if name == "main.py":
            reference = main_py(args, model, command)
            reference(PROMPTS[0])  # warm-up
            continue
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        print(f"{name} {family} {drafter}: starting", file=sys.stderr, flush=True)
        process = start(command(port), url)
        try:
            one_request(url, model, PROMPTS[0], args.max_tokens)  # warm-up: compiled kernels, allocations
            if args.beside_long:
                measured = beside_long(url, model, args.beside_long)
                rows.append({"server": name, "family": family, "drafter": drafter, **measured})
                print(f"  short request's TTFT: {measured['short_ttft_alone'] * 1000:.0f} ms alone, "
                      f"{measured['short_ttft_beside_long'] * 1000:.0f} ms beside a {args.beside_long}-token "
                      f"prompt whose TTFT is {measured['long_ttft'] * 1000:.0f} ms", file=sys.stderr, flush=True)
                continue
            counts = args.mlx_lm_clients if name == "mlx_lm.server" and args.mlx_lm_clients else args.clients
            for clients in counts:
                if clients == 1 and name == "server.py":
                    print("  1 client, in turns with main.py's own decoding", file=sys.stderr, flush=True)
                    measured, direct = one_client_beside(reference, url, model, args.max_tokens)
                    rows.append({"server": "main.py", "family": family, "drafter": drafter, **direct})
                else:
                    measured = load(url, model, clients, args.requests, args.max_tokens)
                rows.append({"server": name, "family": family, "drafter": drafter, **measured})
                print(f"  {clients} clients: {measured['tokens_per_second']:.1f} tok/s, "
                      f"ttft p50 {measured['ttft_p50'] * 1000:.0f} ms", file=sys.stderr, flush=True)
        finally:
            stop(process)
        save(args, rows)
    return rows


def save(args, rows):
    """The results so far as JSON, to --json's FILE if given; returned as text."""
    document = json.dumps({"settings": vars(args), "rows": rows}, indent=1)
    if args.json:
        files.write_atomically(args.json, "w", lambda f: f.write(document))
    return document


def table(rows):
    """The results as a Markdown table."""
    if rows and "long_prompt_tokens" in rows[0]:
        return tabulate([[r["server"], r["family"], r["drafter"], r["long_prompt_tokens"],
                          f"{r['short_ttft_alone'] * 1000:.0f}", f"{r['short_ttft_beside_long'] * 1000:.0f}",
                          f"{r['short_total_beside_long'] * 1000:.0f}", f"{r['long_ttft'] * 1000:.0f}"] for r in rows],
                        ["server", "pair", "drafter", "long prompt tokens", "short TTFT alone ms",
                         "short TTFT beside it ms", "short request's whole time beside it ms",
                         "long prompt's TTFT ms"], tablefmt="github")
    ms = lambda v: "n/a" if v is None else f"{v * 1000:.0f}"  # noqa: E731
    rate = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
    body = [[r["server"], r["family"], r["drafter"], r["clients"], rate(r["requests_per_second"]),
             f"{r['tokens_per_second']:.1f}", ms(r["ttft_p50"]), ms(r["ttft_p95"]), ms(r["itl_p50"]), ms(r["itl_p95"])]
            for r in rows]
    headers = ["server", "pair", "drafter", "clients", "req/s", "out tok/s", "TTFT p50 ms", "TTFT p95 ms",
               "ITL p50 ms", "ITL p95 ms"]
    return tabulate(body, headers, tablefmt="github")


def main(argv=None):
    args = build_parser().parse_args(argv)
    check(args)
    rows = run(args)
    print(table(rows))
    print(save(args, rows))


if __name__ == "__main__":
    main()
