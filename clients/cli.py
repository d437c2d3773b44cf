"""The ``loraserve`` command line.

Every option also reads its default from the environment: ``--max-new-tokens`` from
``LORASERVE_MAX_NEW_TOKENS`` (upper case, dashes to underscores); the global ``--target`` from
``LORASERVE_TARGET`` and ``--token`` from ``LORASERVE_TOKEN``. The exceptions are the client
commands' ``--adapter`` and ``--base-model``: their variables belong to ``serve --adapter
NAME=DIR`` and ``store --base-model DIR``, which mean something else, so a deployment's
environment does not change what ``generate`` or ``list`` ask for. Errors print
``error: <CODE>: <details>`` on stderr and exit non-zero.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Sequence

ENV_PREFIX = "LORASERVE_"
_TRUE = {"1", "true", "yes", "on", "y", "t"}
_FALSE = {"0", "false", "no", "off", "n", "f", ""}
# Variables that configure the servers only: a client flag of the same name means another thing.
SERVER_ONLY_ENV = ("--adapter", "--base-model")
# Repeatable options whose values are folders (NAME=DIR): a variable may list them with commas.
_COMMA_LISTS = ("--adapter", "--base-model")

MAIN_DESCRIPTION = """\
loraserve: serve one base LLM with thousands of LoRA adapters over gRPC (S-LoRA), and talk to it.

Server side: `loraserve serve` (engine + embedded store) and `loraserve store` (the adapter store
alone). Client side: register/list/get/delete adapters, generate text, load/unload adapters on the
engine, show engine stats, and benchmark with `loraserve bench`."""

MAIN_EPILOG = """\
examples:
  loraserve serve --model /models/llama-2-7b --port 50051
  loraserve register ./my-lora --id my-lora
  loraserve generate --adapter my-lora "Tell me a joke"
  loraserve list
  loraserve bench --synthetic --n 100 --rate 2 --duration 60

Every option reads its default from LORASERVE_<OPTION> (e.g. LORASERVE_TARGET, LORASERVE_TOKEN,
LORASERVE_MAX_NEW_TOKENS), except the client commands' --adapter and --base-model: those
variables configure `serve` and `store`. Run `loraserve <command> --help` for a command's options."""


class _Formatter(argparse.RawDescriptionHelpFormatter):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse with loraserve's error format: usage, then ``error: INVALID_ARGUMENT: ...``."""

    def error(self, message: str):
        self.print_usage(sys.stderr)
        self.exit(2, f"error: INVALID_ARGUMENT: {message}\n")


def env_name(option: str) -> str:
    """``--max-new-tokens`` -> ``LORASERVE_MAX_NEW_TOKENS``."""
    return ENV_PREFIX + option.lstrip("-").upper().replace("-", "_")


class EnvError(ValueError):
    pass


def apply_env_defaults(parser: argparse.ArgumentParser, environ=None, skip: Sequence[str] = ()) -> None:
    """Set every optional flag's default from ``LORASERVE_<FLAG>`` when that variable is set,
    and mention the variable in the help; flags in ``skip`` read nothing. Booleans accept 1/0,
    true/false, yes/no, on/off; repeatable flags take one value per line, and values given on
    the command line add to the variable's."""
    environ = os.environ if environ is None else environ
    for action in parser._actions:  # argparse has no public iterator over actions
        if not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction,
                                                            argparse._SubParsersAction)):
            continue
        longs = [o for o in action.option_strings if o.startswith("--")]
        if not longs or longs[0] in skip:
            continue
        var = env_name(longs[0])
        if action.help is not argparse.SUPPRESS and var not in (action.help or ""):
            action.help = f"{action.help or ''} [env {var}]".strip()
        if var not in environ:
            continue
        raw = environ[var]
        try:
            action.default = _convert(action, raw, longs[0] in _COMMA_LISTS)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            raise EnvError(f"{var}={raw!r}: {e}") from None
        if action.required:
            action.required = False


def parse_with_env(parser: argparse.ArgumentParser, argv: Sequence[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args(argv)`` with defaults from the environment; a bad value is a usage
    error that names the variable (``python -m server.app``, ``python -m adapter_store.main``)."""
    try:
        apply_env_defaults(parser)
    except EnvError as e:
        parser.error(str(e))
    return parser.parse_args(argv)


def _convert(action: argparse.Action, raw: str, commas: bool = False):
    if isinstance(action, argparse._StoreTrueAction):
        v = raw.strip().lower()
        if v not in _TRUE | _FALSE:
            raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")
        return v in _TRUE
    if isinstance(action, argparse._StoreFalseAction):
        v = raw.strip().lower()
        if v not in _TRUE | _FALSE:
            raise ValueError("expected a boolean (1/0, true/false, yes/no, on/off)")
        return v not in _TRUE
    if isinstance(action, argparse._CountAction):
        return int(raw)
    conv = action.type or (lambda s: s)
    if isinstance(action, argparse._AppendAction) or action.nargs in ("*", "+"):
        # one value per line; folders also comma separated (a stop string may hold a comma)
        parts = raw.split("\n") if "\n" in raw or not commas else raw.split(",")
        return [conv(p) for p in parts if p != ""]
    v = conv(raw)
    if action.choices is not None and v not in action.choices:
        raise ValueError(f"must be one of {list(action.choices)}")
    return v


def _walk(parser: argparse.ArgumentParser):
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                yield from _walk(sub)


# ---------------------------------------------------------------------------------------- parser

def _token_ids(s: str) -> list[int]:
    try:
        return [int(x) for x in s.replace(" ", ",").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _add_client_cmd(sub, name: str, help: str, description: str, examples: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=description, epilog="examples:\n" + examples,
                          formatter_class=_Formatter)


def _lazy_delegate(sub, name: str, help: str, module: str, add_fn: str, run_fn: str, description: str,
                   load: bool):
    """A subcommand whose options and body live in another module: ``add_fn(parser)`` adds the
    flags, ``run_fn(args)`` runs it. The module (which imports torch) is imported only when this
    subcommand is the one being run (``load``); if it cannot be imported the error is reported
    when the subcommand runs, and ``--help`` says why."""
    p = sub.add_parser(name, help=help, description=description, formatter_class=_Formatter)
    p.set_defaults(_delegate=(module, run_fn))
    if not load:
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return p
    try:
        import importlib  # noqa: PLC0415
        mod = importlib.import_module(module)
        add = getattr(mod, add_fn)
    except Exception as e:  # ImportError, or an error inside the module: report it when run
        p.set_defaults(_delegate_error=f"{module}.{add_fn} is unavailable: {type(e).__name__}: {e}")
        p.epilog = f"note: {module} could not be imported here ({type(e).__name__}: {e})"
        p.add_argument("rest", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
        return p
    add(p)
    return p


_GLOBAL_WITH_VALUE = {"--target", "--token", "--timeout", "--store-target"}


def _command_of(argv: Sequence[str]) -> str | None:
    """The subcommand named in argv (the first positional after the global options)."""
    it = iter(argv)
    for tok in it:
        if tok in _GLOBAL_WITH_VALUE:
            next(it, None)
        elif tok.startswith("-"):
            continue
        else:
            return tok
    return None


def _global_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of a global option given before the subcommand (``--flag V`` or ``--flag=V``)."""
    it = iter(argv)
    for tok in it:
        if tok == flag:
            return next(it, None)
        if tok.startswith(flag + "="):
            return tok.split("=", 1)[1]
        if tok in _GLOBAL_WITH_VALUE:
            next(it, None)
        elif not tok.startswith("-"):
            return None
    return None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The full parser; ``serve``/``store`` import their modules only when argv names them."""
    command = _command_of(sys.argv[1:] if argv is None else argv)
    parser = _Parser(prog="loraserve", description=MAIN_DESCRIPTION, epilog=MAIN_EPILOG,
                                     formatter_class=_Formatter)
    parser.add_argument("--target", default="localhost:50051",
                        help="server address host:port (default localhost:50051)")
    parser.add_argument("--token", default=None, help="bearer token sent as 'authorization: Bearer <token>'")
    parser.add_argument("--timeout", type=float, default=None, help="deadline of each call in seconds")
    parser.add_argument("--store-target", default=None,
                        help="adapter store host:port when it runs as its own service (default: --target)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")

    # -- server-side commands (delegated; their modules import torch, so only when asked for)
    _lazy_delegate(sub, "serve", "run the engine (and an embedded adapter store) on one port",
                   "server.app", "add_serve_args", "serve",
                   "Run the loraserve engine: Inference, AdapterStore (embedded unless --store-target), "
                   "EngineAdmin, health and reflection on one gRPC port.\n\nexample:\n"
                   "  loraserve serve --model /models/llama-2-7b --port 50051", load=command == "serve")
    _lazy_delegate(sub, "store", "run the adapter store service alone (Redis + object storage)",
                   "adapter_store.main", "add_store_args", "run_store",
                   "Run the AdapterStore gRPC service: metadata in Redis, blobs in object storage.\n\n"
                   "example:\n  loraserve store --redis-url redis://localhost:6379 "
                   "--object-store s3://loraserve/adapters --port 50052", load=command == "store")

    # -- register
    p = _add_client_cmd(sub, "register", "upload a PEFT LoRA folder to the adapter store",
                        "Upload a PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) "
                        "to the adapter store. The store validates it against the base model before it "
                        "becomes visible. Pickled adapter_model.bin files are refused.",
                        "  loraserve register ./llama2-sql-lora --id sql\n"
                        "  loraserve register ./lora --id sql --replace --base-model llama-2-7b\n"
                        "  loraserve register --synthetic-rank 16 --id fake-16   # weights made by the store\n")
    p.add_argument("dir", nargs="?", help="PEFT adapter folder")
    p.add_argument("--id", required=True, dest="adapter_id", help="adapter id to register under")
    p.add_argument("--base-model", default="", help="base model name (default: the store's)")
    p.add_argument("--replace", action="store_true", help="replace an existing adapter of this id")
    p.add_argument("--no-progress", action="store_true", help="no upload progress bar")
    p.add_argument("--synthetic-rank", type=int, default=None,
                   help="register a synthetic adapter of this rank instead of uploading a folder")
    p.add_argument("--synthetic-targets", default="q_proj,k_proj,v_proj,o_proj",
                   help="target modules of a synthetic adapter (default q_proj,k_proj,v_proj,o_proj)")
    p.add_argument("--synthetic-seed", type=int, default=0, help="seed of a synthetic adapter's weights")
    p.add_argument("--json", action="store_true", help="print the adapter record as JSON")
    p.set_defaults(func=cmd_register)

    # -- list
    p = _add_client_cmd(sub, "list", "list registered adapters",
                        "List the adapters in the store (all pages), optionally of one base model.",
                        "  loraserve list\n  loraserve list --base-model llama-2-7b --json\n")
    p.add_argument("--base-model", default="", help="only adapters of this base model")
    p.add_argument("--page-size", type=int, default=0, help="page size of each ListAdapters call (0: server default)")
    p.add_argument("--json", action="store_true", help="print JSON (one array)")
    p.set_defaults(func=cmd_list)

    # -- get
    p = _add_client_cmd(sub, "get", "show one adapter's record",
                        "Show one adapter's record: base model, rank, alpha, target modules, size, sha256.",
                        "  loraserve get sql\n  loraserve get sql --json\n")
    p.add_argument("adapter_id", help="adapter id")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_get)

    # -- delete
    p = _add_client_cmd(sub, "delete", "delete an adapter from the store",
                        "Delete an adapter from the store; engines drop it from memory.",
                        "  loraserve delete sql\n")
    p.add_argument("adapter_id", help="adapter id")
    p.set_defaults(func=cmd_delete)

    # -- generate
    p = _add_client_cmd(sub, "generate", "generate text, streaming it to the terminal",
                        "Generate from a prompt with an adapter (or the base model when --adapter is empty), "
                        "printing text as it streams in. The prompt may be '-' to read stdin; --token-ids "
                        "sends token ids instead of text.",
                        "  loraserve generate --adapter sql \"List all users older than 30\"\n"
                        "  loraserve generate \"Once upon a time\" --max-new-tokens 64 --temperature 0.8 --seed 1\n"
                        "  echo 'Hello' | loraserve generate --adapter chat -\n"
                        "  loraserve generate --token-ids 1,15043,29892 --max-new-tokens 8 --json\n")
    p.add_argument("prompt", nargs="?", help="prompt text ('-': read stdin)")
    p.add_argument("--adapter", default="", help="adapter id (default: the base model)")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most (default 128)")
    p.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (0: greedy, the default)")
    p.add_argument("--top-p", type=float, default=0.0, help="nucleus sampling (0 or 1: off)")
    p.add_argument("--top-k", type=int, default=0, help="top-k sampling (0: off)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (same seed, same output)")
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-sequence token")
    p.add_argument("--logprobs", action="store_true", help="print each token's log-probability after the text")
    p.add_argument("--token-ids", type=_token_ids, default=None, metavar="1,2,3", help="prompt as token ids")
    p.add_argument("--request-id", default="", help="request id (default: server-assigned)")
    p.add_argument("--json", action="store_true", help="print every streamed chunk as a JSON line")
    p.add_argument("--route", action="store_true",
                   help="send it to the engine that holds the adapter (or should load it), among the engines "
                        "heartbeating to the adapter store at --store-target (default --target)")
    p.add_argument("--base-model", default="", help="with --route: only engines of this base model")
    p.set_defaults(func=cmd_generate)

    # -- engines
    p = _add_client_cmd(sub, "engines", "list the engines that heartbeat to the adapter store",
                        "List the live engines sharing the adapter store (its Redis): address, base model, "
                        "running and waiting requests, and the adapters in each one's GPU pool. "
                        "`generate --route` picks among them.",
                        "  loraserve --store-target store:50052 engines\n  loraserve engines --adapter sql --json\n")
    p.add_argument("--base-model", default="", help="only engines of this base model")
    p.add_argument("--adapter", default="", help="mark the engines holding this adapter, in routing order")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_engines)

    # -- load / unload
    p = _add_client_cmd(sub, "load", "load an adapter into the engine's GPU pool now",
                        "Load an adapter into the engine's memory pool ahead of requests (it is loaded "
                        "on demand otherwise).", "  loraserve load sql\n")
    p.add_argument("adapter_id", help="adapter id")
    p.set_defaults(func=cmd_load)
    p = _add_client_cmd(sub, "unload", "evict an adapter from the engine's GPU pool",
                        "Evict an adapter from the engine's memory pool (it stays registered).",
                        "  loraserve unload sql\n  loraserve unload sql --keep-host\n")
    p.add_argument("adapter_id", help="adapter id")
    p.add_argument("--keep-host", action="store_true",
                   help="leave only the GPU pool: keep the engine's host-memory copy (a later load is one copy)")
    p.set_defaults(func=cmd_unload)

    # -- stats
    p = _add_client_cmd(sub, "stats", "show engine statistics (pool pages, queues, resident adapters)",
                        "Show the engine's statistics: memory pool pages (KV, adapters, free), running and "
                        "waiting requests, resident and cached adapters, steps, tokens, preemptions.",
                        "  loraserve stats\n  loraserve --target gpu-box:50051 stats --json\n")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_stats)

    # -- health
    p = _add_client_cmd(sub, "health", "check the server's grpc.health.v1 status",
                        "Check grpc.health.v1.Health; exits 0 when SERVING, 1 otherwise.",
                        "  loraserve health\n  loraserve health --service loraserve.v1.Inference\n")
    p.add_argument("--service", default="", help="service name (default: the whole server)")
    p.set_defaults(func=cmd_health)

    # -- bench
    from clients.bench import BENCH_DESCRIPTION, BENCH_EPILOG, add_bench_args  # noqa: PLC0415
    p = sub.add_parser("bench", help="benchmark with S-LoRA's synthetic workload",
                       description=BENCH_DESCRIPTION, epilog=BENCH_EPILOG, formatter_class=_Formatter)
    add_bench_args(p)
    p.set_defaults(func=cmd_bench)
    return parser


# ---------------------------------------------------------------------------------------- commands

def _client(args):
    from clients.client import Client  # noqa: PLC0415
    return Client(args.target, token=args.token or None, timeout=args.timeout,
                  store_target=getattr(args, "store_target", None) or None)


def _router(args):
    from clients.router import Router  # noqa: PLC0415
    return Router(getattr(args, "store_target", None) or args.target, base_model=getattr(args, "base_model", ""),
                  token=args.token or None, timeout=args.timeout)


def cmd_engines(args) -> int:
    from clients.router import EngineView, choose  # noqa: PLC0415
    with _client(args) as c:
        views = [EngineView.from_pb(e) for e in c.list_engines(base_model=args.base_model)]
    if args.adapter:
        views = choose(views, args.adapter)
    if args.json:
        _print_json([{**vars(v), "resident": sorted(v.resident), "holds_adapter": args.adapter in v.resident}
                     for v in views])
        return 0
    if not views:
        print("no engine heartbeats to this store")
        return 0
    rows = [(v.address, v.base_model or "-", str(v.running), str(v.waiting), str(len(v.resident)),
             f"{v.heartbeat_age_s:.1f}s", ("holds " + args.adapter) if args.adapter in v.resident else "")
            for v in views]
    head = ("ADDRESS", "MODEL", "RUNNING", "WAITING", "ADAPTERS", "HEARTBEAT", "")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(x.ljust(w) for x, w in zip(r, widths)).rstrip())
    return 0


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _print_adapter(info) -> None:
    import datetime  # noqa: PLC0415
    created = (datetime.datetime.fromtimestamp(info.created_at, datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
               if info.created_at else "-")
    rows = [("adapter_id", info.adapter_id), ("base_model", info.base_model or "-"), ("rank", info.rank),
            ("alpha", f"{info.alpha:g}"), ("target_modules", ",".join(info.target_modules)),
            ("size", _human_bytes(info.size_bytes)), ("sha256", info.sha256 or "-"), ("created_at", created),
            ("version", info.version), ("use_rslora", info.use_rslora), ("synthetic", info.synthetic)]
    for k, v in rows:
        print(f"{k:15s} {v}")


def cmd_register(args) -> int:
    with _client(args) as c:
        if args.synthetic_rank is not None:
            if args.dir:
                raise _UsageError("give a folder or --synthetic-rank, not both")
            info = c.register_synthetic(args.adapter_id, rank=args.synthetic_rank,
                                        target_modules=args.synthetic_targets, seed=args.synthetic_seed,
                                        base_model=args.base_model, replace=args.replace)
        else:
            if not args.dir:
                raise _UsageError("a PEFT adapter folder is required (or --synthetic-rank)")
            info = c.register_adapter(args.dir, args.adapter_id, base_model=args.base_model, replace=args.replace,
                                      progress=not args.no_progress)
    if args.json:
        _print_json(info.to_dict())
    else:
        print(f"registered {info.adapter_id}: rank {info.rank}, alpha {info.alpha:g}, "
              f"{','.join(info.target_modules)}, {_human_bytes(info.size_bytes)}"
              + (f", base {info.base_model}" if info.base_model else "") + (f", version {info.version}" if info.version else ""))
    return 0


def cmd_list(args) -> int:
    with _client(args) as c:
        items = list(c.list_adapters(base_model=args.base_model, page_size=args.page_size))
    if args.json:
        _print_json([a.to_dict() for a in items])
        return 0
    head = ("ADAPTER", "BASE MODEL", "RANK", "ALPHA", "TARGETS", "SIZE")
    rows = [(a.adapter_id, a.base_model or "-", str(a.rank), f"{a.alpha:g}", ",".join(a.target_modules),
             _human_bytes(a.size_bytes)) for a in items]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(head)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)).rstrip())
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    print(f"{len(rows)} adapter(s)", file=sys.stderr)
    return 0


def cmd_get(args) -> int:
    with _client(args) as c:
        info = c.get_adapter(args.adapter_id)
    if args.json:
        _print_json(info.to_dict())
    else:
        _print_adapter(info)
    return 0


def cmd_delete(args) -> int:
    with _client(args) as c:
        deleted = c.delete_adapter(args.adapter_id)
    print(f"deleted {args.adapter_id}" if deleted else f"{args.adapter_id} was not deleted")
    return 0 if deleted else 1


def cmd_generate(args) -> int:
    prompt = args.prompt
    if args.token_ids is not None:
        if prompt is not None:
            raise _UsageError("give a prompt or --token-ids, not both")
    else:
        if prompt is None:
            raise _UsageError("a prompt is required (or --token-ids, or '-' for stdin)")
        if prompt == "-":
            prompt = sys.stdin.read()
    out = sys.stdout
    ids, lps, last = [], [], None
    with (_router(args) if args.route else _client(args)) as c:
        stream = c.generate(prompt, prompt_token_ids=args.token_ids, adapter_id=args.adapter,
                            max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            top_k=args.top_k, seed=args.seed, stop=args.stop, ignore_eos=args.ignore_eos,
                            logprobs=args.logprobs, request_id=args.request_id)
        for chunk in stream:
            last = chunk
            if args.json:
                d = {"token_ids": chunk.token_ids, "text": chunk.text}
                if chunk.logprobs:
                    d["logprobs"] = chunk.logprobs
                if chunk.finished:
                    d.update(finished=True, finish_reason=chunk.finish_reason,
                             usage=vars(chunk.usage) if chunk.usage else None, request_id=chunk.request_id)
                out.write(json.dumps(d) + "\n")
            else:
                out.write(chunk.text)
            out.flush()
            ids.extend(chunk.token_ids)
            lps.extend(chunk.logprobs)
    if not args.json:
        out.write("\n")
        if args.logprobs:
            for t, lp in zip(ids, lps):
                out.write(f"{t}\t{lp:.4f}\n")
        if last is not None and last.finished:
            usage = last.usage
            u = f", {usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens" if usage else ""
            e = f", engine {last.engine}" if last.engine else ""
            print(f"[finish: {last.finish_reason or '-'}{u}{e}]", file=sys.stderr)
    out.flush()
    return 0


def cmd_load(args) -> int:
    with _client(args) as c:
        r = c.load_adapter(args.adapter_id)
    print(f"loaded {args.adapter_id} ({r.pages} pages)" if r.loaded else f"{args.adapter_id} was not loaded")
    return 0 if r.loaded else 1


def cmd_unload(args) -> int:
    with _client(args) as c:
        ok = c.unload_adapter(args.adapter_id, keep_host=args.keep_host)
    print(f"unloaded {args.adapter_id}" if ok else f"{args.adapter_id} was not resident")
    return 0


def cmd_stats(args) -> int:
    with _client(args) as c:
        s = c.stats()
    if args.json:
        _print_json(s.to_dict())
        return 0
    p = s.pool
    used = p.kv_pages + p.adapter_pages
    print(f"model            {s.model or '-'} on {s.device or '-'} ({s.dtype or '-'})")
    print(f"pool pages       {p.total_pages} total: {p.kv_pages} KV, {p.adapter_pages} adapters, {p.free_pages} free"
          + (f" ({100 * used / p.total_pages:.1f}% used)" if p.total_pages else ""))
    print(f"page             {_human_bytes(p.page_bytes)}, {p.block_tokens} tokens per KV block; adapter rows "
          + (f"{p.adapter_dtype} with a scale per row" if p.adapter_dtype in ("int8", "int4")
             else p.adapter_dtype or s.dtype or "-"))
    print(f"requests         {s.running} running, {s.waiting} waiting")
    print(f"steps            {s.steps}  generated tokens {s.generated_tokens}  preemptions {s.preemptions}")
    if s.decode_steps:
        w = s.decode_window()
        share = f" ({100 * w['adapter_bytes_vs_weights']:.1f}% of the weights)" if w["adapter_bytes_vs_weights"] else ""
        print(f"decode steps     {w['decode_steps']}: {w['mean_batch']:.1f} tokens, {w['mean_distinct_adapters']:.1f} "
              f"distinct adapters, {_human_bytes(w['adapter_bytes_per_step'])} of adapter rows per step{share}")
    if s.busy_seconds:
        t = s.time_window()
        print(f"engine time      {t['busy_s']:.1f} s busy, {t['ms_per_step']} ms per step: {100 * t['device_share']:.0f}% "
              f"device, {100 * t['host_share']:.0f}% host, {100 * t['outside_share']:.0f}% outside steps; "
              f"{t['graph_steps']} graph steps, {t['prefill_steps']} prefill steps"
              + (f"; the GPU busy {100 * t['gpu_share']:.0f}% of the time" if (s.device or "").startswith("cuda") else ""))
    print(f"adapter loads    {s.adapter_loads} into the pool ({s.adapter_preloads} before admission)")
    print(f"resident ({len(s.resident_adapters)})    {', '.join(s.resident_adapters) or '-'}")
    print(f"cached ({len(s.cached_adapters)})      {', '.join(s.cached_adapters) or '-'}")
    return 0


def cmd_health(args) -> int:
    with _client(args) as c:
        status = c.health(args.service)
    print(status)
    return 0 if status == "SERVING" else 1


def cmd_bench(args) -> int:
    from clients.bench import run_bench  # noqa: PLC0415
    return run_bench(args)


def _run_delegate(args) -> int:
    err = getattr(args, "_delegate_error", None)
    if err:
        raise _UsageError(err, code="UNAVAILABLE")
    import importlib  # noqa: PLC0415
    module, fn = args._delegate
    rc = getattr(importlib.import_module(module), fn)(args)
    return int(rc or 0)


class _UsageError(Exception):
    def __init__(self, msg: str, code: str = "INVALID_ARGUMENT"):
        super().__init__(msg)
        self.code = code


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point: ``loraserve = clients.cli:main``. Returns the exit status."""
    from clients.client import LoraServeError  # noqa: PLC0415

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    try:
        for p in _walk(parser):
            apply_env_defaults(p, skip=() if p.get_default("_delegate") else SERVER_ONLY_ENV)
    except EnvError as e:
        print(f"error: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    # `loraserve --token X serve`: serve/store define their own --token, whose default would
    # otherwise hide the global one given before the command
    if getattr(args, "token", None) is None:
        args.token = _global_value(argv, "--token")
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return 2
    try:
        if getattr(args, "_delegate", None):
            return _run_delegate(args)
        return int(args.func(args) or 0)
    except LoraServeError as e:
        print(f"error: {e.code.name}: {e.details}", file=sys.stderr)
        return 1
    except _UsageError as e:
        print(f"error: {e.code}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: CANCELLED: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ValueError, OSError) as e:
        print(f"error: INVALID_ARGUMENT: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
