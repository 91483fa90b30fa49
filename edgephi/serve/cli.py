"""`edgephi serve BUNDLE`: flags and the command (the server's modules load only when it runs)."""
from __future__ import annotations

import os
import sys


def add_arguments(p) -> None:
    p.add_argument("bundle", nargs="?", default=None,
                   help="bundle directory from `edgephi export` (default: the built-in model)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; anything else warns)")
    p.add_argument("--port", type=int, default=8080)
    p.add_argument("--api-key", default=None,
                   help="require `Authorization: Bearer KEY` (default: $EDGEPHI_API_KEY, else none)")
    p.add_argument("--parallel", type=int, default=1, help="sessions answering at once (default 1)")
    p.add_argument("--queue", type=int, default=None,
                   help="requests that may wait for a session beyond those (default 4 × parallel; then 503)")
    p.add_argument("--ctx", type=int, default=None, help="context length of each session (default: the model's, "
                   "capped)")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="default and ceiling of a request's max_tokens (default: the rest of the context)")
    p.add_argument("--max-body", type=int, default=4 << 20, help="largest request body in bytes (default 4 MiB)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "npu", "metal", "cuda"])
    p.add_argument("--format", default=None, help="force one format of the bundle (onnx, gguf, ...)")
    p.add_argument("--speculate", default=None, metavar="ngram|DRAFT_BUNDLE",
                   help="speculative decoding for every request: prompt lookup (ngram) or a draft bundle with the "
                        "same vocabulary; usage reports accepted/rejected_prediction_tokens")
    p.add_argument("--prompt-cache", default=None, metavar="FILE",
                   help="start every session from this saved prefix (Model.save_prompt_cache or "
                        "`edgephi run --prompt-cache`); a file from another bundle is refused")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads per session (default: the physical cores shared out between the sessions)")


def cmd_serve(args) -> int:
    from . import is_loopback, load_server, serve

    for flag, value, low in (("--port", args.port, 0), ("--parallel", args.parallel, 1), ("--queue", args.queue, 0),
                             ("--ctx", args.ctx, 1), ("--max-tokens", args.max_tokens, 1),
                             ("--max-body", args.max_body, 1024), ("--threads", args.threads, 1)):
        if value is not None and value < low:
            raise ValueError(f"{flag} {value}: must be >= {low}")
    if args.port > 65535:
        raise ValueError(f"--port {args.port}: must be <= 65535")
    key = args.api_key if args.api_key is not None else os.environ.get("EDGEPHI_API_KEY") or None
    if not is_loopback(args.host):
        print(f"edgephi: warning: --host {args.host} accepts connections from other machines"
              + ("" if key else "; anyone who reaches it can use the model (set --api-key)"), file=sys.stderr)
    bundle = args.bundle
    if bundle is None:
        from edgephi.export.bundle import default_bundle  # the CLI exports the built-in model on first use

        bundle = default_bundle()
    server = load_server(bundle, parallel=args.parallel, device=args.device, format=args.format, ctx=args.ctx,
                         threads=args.threads, api_key=key, max_queue=args.queue, max_body=args.max_body,
                         max_tokens=args.max_tokens, speculate=args.speculate, prompt_cache=args.prompt_cache)
    m = server.model
    print(f"edgephi serve: http://{args.host if ':' not in args.host else f'[{args.host}]'}:{args.port} · model "
          f"{server.model_id} · {m.backend} on {m.device} · {args.parallel} session(s) of {server.n_ctx} tokens"
          f" · API key {'required' if key else 'off'}"
          + (f" · speculate {args.speculate}" if args.speculate else ""), file=sys.stderr, flush=True)
    serve(server, args.host, args.port)
    return 0
