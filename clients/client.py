"""loraserve client library: a typed wrapper over the generated gRPC stubs.

Two clients with the same methods:

- ``Client(target, token=None, timeout=None)``: blocking, over ``grpc.Channel``.
- ``AsyncClient(target, token=None, timeout=None)``: asyncio, over ``grpc.aio``.

Errors are raised as ``LoraServeError`` subclasses that keep the gRPC ``.code`` and ``.details``.
Safe (read-only / idempotent) RPCs are retried with exponential backoff on UNAVAILABLE:
GetAdapter, ListAdapters, FetchAdapter, GetStats, Health. ``Generate`` is retried only while no
response has arrived yet (the stream has not started); RegisterAdapter, DeleteAdapter,
LoadAdapter and UnloadAdapter are never retried.

    with Client("localhost:50051") as c:
        for chunk in c.generate("Hello", adapter_id="my-lora", max_new_tokens=32):
            print(chunk.text, end="", flush=True)
        print(c.complete("Hi", max_new_tokens=8).text)
"""
from __future__ import annotations

import asyncio
import hashlib
import os
import pathlib
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import AsyncIterator, Iterable, Iterator, Sequence

import grpc
from google.protobuf.descriptor import FieldDescriptor

from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc

try:  # grpcio-health-checking
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError:  # pragma: no cover - the dependency is in pyproject
    health_pb2 = health_pb2_grpc = None

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
DEFAULT_TARGET = "localhost:50051"
DEFAULT_CHUNK_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20

__all__ = [
    "Client", "AsyncClient", "GenerateChunk", "Completion", "Usage", "AdapterInfo", "PoolStats",
    "EngineStats", "LoadResult", "FetchedAdapter", "LoraServeError", "NotFound", "InvalidArgument",
    "AlreadyExists", "ResourceExhausted", "Unavailable", "Unauthenticated", "DeadlineExceeded",
    "PermissionDenied", "FailedPrecondition", "Cancelled", "Internal", "Unimplemented",
    "RetryPolicy", "FINISH_REASONS",
]


# ---------------------------------------------------------------------------------------- errors

class LoraServeError(Exception):
    """An RPC failed. ``code`` is a ``grpc.StatusCode``; ``details`` the server's message."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN

    def __init__(self, details: str = "", code: grpc.StatusCode | None = None):
        if code is not None:
            self.code = code
        self.details = details or ""
        super().__init__(f"{self.code.name}: {self.details}")


class NotFound(LoraServeError):
    code = grpc.StatusCode.NOT_FOUND


class InvalidArgument(LoraServeError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class AlreadyExists(LoraServeError):
    code = grpc.StatusCode.ALREADY_EXISTS


class ResourceExhausted(LoraServeError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(LoraServeError):
    code = grpc.StatusCode.UNAVAILABLE


class Unauthenticated(LoraServeError):
    code = grpc.StatusCode.UNAUTHENTICATED


class DeadlineExceeded(LoraServeError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class PermissionDenied(LoraServeError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(LoraServeError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Cancelled(LoraServeError):
    code = grpc.StatusCode.CANCELLED


class Internal(LoraServeError):
    code = grpc.StatusCode.INTERNAL


class Unimplemented(LoraServeError):
    code = grpc.StatusCode.UNIMPLEMENTED


_ERRORS = {cls.code: cls for cls in (NotFound, InvalidArgument, AlreadyExists, ResourceExhausted,
                                     Unavailable, Unauthenticated, DeadlineExceeded, PermissionDenied,
                                     FailedPrecondition, Cancelled, Internal, Unimplemented)}


def error_from_rpc(err: grpc.RpcError) -> LoraServeError:
    """The typed error for a ``grpc.RpcError`` (sync or aio)."""
    try:
        code, details = err.code(), err.details()
    except Exception:  # not a call object
        code, details = grpc.StatusCode.UNKNOWN, str(err)
    if code == grpc.StatusCode.UNIMPLEMENTED:
        details = (f"{details or 'not implemented'}: the server does not offer this call (an engine started with "
                   f"--no-store serves no AdapterStore: point --store-target at an adapter store)")
    cls = _ERRORS.get(code, LoraServeError)
    return cls(details or "", code=code)


# ---------------------------------------------------------------------------------------- results

FINISH_REASONS = {
    pb.FINISH_REASON_UNSPECIFIED: "", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_EOS: "eos",
    pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_ABORTED: "aborted",
}


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class GenerateChunk:
    """One streamed message: the new tokens since the previous one."""
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finished: bool
    finish_reason: str          # "", "length", "eos", "stop", "aborted"
    usage: Usage | None         # set on the last chunk
    request_id: str = ""
    engine: str = ""            # the engine that served it, where a Router chose one


@dataclass
class Completion:
    """All chunks of one generation joined; latencies in seconds measured by the client."""
    text: str
    token_ids: list[int]
    logprobs: list[float]
    finish_reason: str
    usage: Usage
    request_id: str = ""
    first_token_latency: float | None = None
    latency: float = 0.0
    engine: str = ""            # the engine that served it, where a Router chose one


@dataclass
class AdapterInfo:
    adapter_id: str
    base_model: str = ""
    rank: int = 0
    alpha: float = 0.0
    target_modules: list[str] = field(default_factory=list)
    size_bytes: int = 0
    sha256: str = ""
    created_at: int = 0
    use_rslora: bool = False
    version: int = 0
    synthetic: bool = False

    @classmethod
    def from_pb(cls, m: pb.AdapterInfo) -> "AdapterInfo":
        return cls(adapter_id=m.adapter_id, base_model=m.base_model, rank=m.rank, alpha=m.alpha,
                   target_modules=list(m.target_modules), size_bytes=m.size_bytes, sha256=m.sha256,
                   created_at=m.created_at, use_rslora=m.use_rslora, version=m.version,
                   synthetic=m.synthetic)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PoolStats:
    total_pages: int = 0
    kv_pages: int = 0
    adapter_pages: int = 0
    free_pages: int = 0
    page_bytes: int = 0
    block_tokens: int = 0
    adapter_dtype: str = ""      # adapter rows: the model's dtype, "int8" or "int4" (a scale per row)


@dataclass
class EngineStats:
    pool: PoolStats
    running: int = 0
    waiting: int = 0
    resident_adapters: list[str] = field(default_factory=list)
    cached_adapters: list[str] = field(default_factory=list)
    steps: int = 0
    generated_tokens: int = 0
    preemptions: int = 0
    model: str = ""
    device: str = ""
    dtype: str = ""
    decode_steps: int = 0
    decode_tokens: int = 0
    decode_adapters: int = 0          # distinct adapters, summed over decode steps
    decode_adapter_bytes: int = 0     # their rows' bytes, summed over decode steps
    weight_bytes: int = 0
    adapter_loads: int = 0
    adapter_preloads: int = 0
    busy_seconds: float = 0.0         # the engine loop's wall time while it had work
    host_seconds: float = 0.0         # of it: scheduling, batch metadata, output handling
    device_seconds: float = 0.0       # of it: launching steps and waiting for their tokens
    prefill_steps: int = 0
    prefill_tokens: int = 0
    graph_steps: int = 0
    gpu_seconds: float = 0.0          # the GPU's own time on steps (host work overlaps it)

    def decode_window(self, before: "EngineStats | None" = None) -> dict:
        """Per decode step since ``before`` (or since start): mean batch, distinct adapters, and
        the adapter bytes read against the base weights'."""
        b = before or EngineStats(PoolStats())
        n = self.decode_steps - b.decode_steps
        per = lambda a, z: (a - z) / n if n else 0.0  # noqa: E731
        ab = per(self.decode_adapter_bytes, b.decode_adapter_bytes)
        return {"decode_steps": n, "mean_batch": round(per(self.decode_tokens, b.decode_tokens), 2),
                "mean_distinct_adapters": round(per(self.decode_adapters, b.decode_adapters), 2),
                "adapter_bytes_per_step": int(ab),
                "adapter_GB_per_step": round(ab / 1e9, 6),
                "adapter_bytes_vs_weights": round(ab / self.weight_bytes, 4) if self.weight_bytes else None,
                "adapter_loads": self.adapter_loads - b.adapter_loads,
                "adapter_preloads": self.adapter_preloads - b.adapter_preloads,
                **self.time_window(b)}

    def time_window(self, before: "EngineStats | None" = None) -> dict:
        """Where the engine loop's time went since ``before``: steps per busy second, and the
        busy time's shares on the device, on the host (scheduling, batch metadata, outputs) and
        outside steps (the inbox, waiting for the GIL the gRPC threads hold)."""
        b = before or EngineStats(PoolStats())
        busy = self.busy_seconds - b.busy_seconds
        steps = self.steps - b.steps
        host, dev = self.host_seconds - b.host_seconds, self.device_seconds - b.device_seconds
        share = lambda x: round(x / busy, 3) if busy > 0 else None  # noqa: E731
        return {"busy_s": round(busy, 3), "steps": steps,
                "ms_per_step": round(1e3 * busy / steps, 2) if steps else None,
                "graph_steps": self.graph_steps - b.graph_steps,
                "prefill_steps": self.prefill_steps - b.prefill_steps,
                "prefill_tokens": self.prefill_tokens - b.prefill_tokens,
                "device_share": share(dev), "host_share": share(host),
                "outside_share": share(busy - host - dev),
                "gpu_share": share(self.gpu_seconds - b.gpu_seconds)}

    @classmethod
    def from_pb(cls, m: pb.EngineStats) -> "EngineStats":
        p = m.pool
        return cls(pool=PoolStats(p.total_pages, p.kv_pages, p.adapter_pages, p.free_pages, p.page_bytes,
                                  p.block_tokens, p.adapter_dtype),
                   running=m.running, waiting=m.waiting, resident_adapters=list(m.resident_adapters),
                   cached_adapters=list(m.cached_adapters), steps=m.steps,
                   generated_tokens=m.generated_tokens, preemptions=m.preemptions, model=m.model,
                   device=m.device, dtype=m.dtype, decode_steps=m.decode_steps, decode_tokens=m.decode_tokens,
                   decode_adapters=m.decode_adapters, decode_adapter_bytes=m.decode_adapter_bytes,
                   weight_bytes=m.weight_bytes, adapter_loads=m.adapter_loads, adapter_preloads=m.adapter_preloads,
                   busy_seconds=m.busy_seconds, host_seconds=m.host_seconds, device_seconds=m.device_seconds,
                   prefill_steps=m.prefill_steps, prefill_tokens=m.prefill_tokens, graph_steps=m.graph_steps,
                   gpu_seconds=m.gpu_seconds)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class LoadResult:
    loaded: bool
    pages: int


@dataclass
class FetchedAdapter:
    """An adapter's record and files as FetchAdapter streamed them (files empty for synthetic ones
    when the store sends no chunks)."""
    info: AdapterInfo
    files: dict[str, bytes]

    def save(self, directory: str | os.PathLike) -> pathlib.Path:
        d = pathlib.Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        for name, data in self.files.items():
            (d / pathlib.Path(name).name).write_bytes(data)
        return d


def _chunk_from_pb(m: pb.GenerateResponse) -> GenerateChunk:
    usage = Usage(m.usage.prompt_tokens, m.usage.completion_tokens) if m.HasField("usage") else None
    return GenerateChunk(token_ids=list(m.token_ids), text=m.text, logprobs=list(m.logprobs),
                         finished=m.finished, finish_reason=FINISH_REASONS.get(m.finish_reason, ""),
                         usage=usage, request_id=m.request_id)


class _Joiner:
    def __init__(self):
        self.t0 = time.perf_counter()
        self.text: list[str] = []
        self.ids: list[int] = []
        self.lps: list[float] = []
        self.reason = ""
        self.usage: Usage | None = None
        self.rid = ""
        self.engine = ""
        self.ttft: float | None = None

    def add(self, c: GenerateChunk) -> None:
        if self.ttft is None and (c.token_ids or c.text):
            self.ttft = time.perf_counter() - self.t0
        self.text.append(c.text)
        self.ids.extend(c.token_ids)
        self.lps.extend(c.logprobs)
        self.rid = c.request_id or self.rid
        self.engine = c.engine or self.engine
        if c.finished:
            self.reason = c.finish_reason
        if c.usage is not None:
            self.usage = c.usage

    def result(self) -> Completion:
        usage = self.usage or Usage(0, len(self.ids))
        return Completion(text="".join(self.text), token_ids=self.ids, logprobs=self.lps,
                          finish_reason=self.reason, usage=usage, request_id=self.rid,
                          first_token_latency=self.ttft, latency=time.perf_counter() - self.t0, engine=self.engine)


# ---------------------------------------------------------------------------------------- requests

def build_generate_request(prompt: str | None = None, *, prompt_token_ids: Sequence[int] | None = None,
                           adapter_id: str = "", max_new_tokens: int = 0, temperature: float = 0.0,
                           top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                           stop: Sequence[str] | str | None = None, ignore_eos: bool = False,
                           logprobs: bool = False, request_id: str = "") -> pb.GenerateRequest:
    """The GenerateRequest for these arguments. ``prompt`` may also be a list of token ids."""
    if isinstance(prompt, (bytes, bytearray, memoryview)):
        raise InvalidArgument("prompt is bytes: pass text (str), or token ids as a list of ints")
    if prompt is not None and not isinstance(prompt, str):
        if prompt_token_ids is not None:
            raise InvalidArgument("give prompt or prompt_token_ids, not both")
        prompt_token_ids, prompt = list(prompt), None
    if prompt is None and prompt_token_ids is None:
        raise InvalidArgument("a prompt or prompt_token_ids is required")
    if prompt is not None and prompt_token_ids is not None:
        raise InvalidArgument("give prompt or prompt_token_ids, not both")
    if isinstance(stop, str):
        stop = [stop]
    params = _pb(pb.SamplingParams, max_new_tokens=max_new_tokens or 0, temperature=temperature or 0.0,
                 top_p=top_p or 0.0, top_k=top_k or 0, stop=list(stop or []), ignore_eos=bool(ignore_eos),
                 logprobs=bool(logprobs), **({} if seed is None else {"seed": seed}))
    req = pb.GenerateRequest(request_id=request_id or "", adapter_id=adapter_id or "", params=params)
    if prompt is not None:
        req.prompt = prompt
    else:
        req.prompt_token_ids.CopyFrom(_pb(pb.TokenIds, ids=list(prompt_token_ids)))
    return req


def _pb(cls, **fields):
    """A message of scalar and repeated fields, where a value the field cannot hold is an
    InvalidArgument that names the field (protobuf's own error says only "Value out of range")."""
    msg = cls()
    for name, value in fields.items():
        value = _coerce(cls.DESCRIPTOR.fields_by_name[name], value)
        try:
            if isinstance(value, list):
                getattr(msg, name).extend(value)
            else:
                setattr(msg, name, value)
        except (ValueError, TypeError) as e:
            shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
            raise InvalidArgument(f"{name}={shown} does not fit the field ({cls.DESCRIPTOR.name}.{name}): {e}") from None
    return msg


_INT_FIELDS = (FieldDescriptor.CPPTYPE_INT32, FieldDescriptor.CPPTYPE_INT64, FieldDescriptor.CPPTYPE_UINT32,
               FieldDescriptor.CPPTYPE_UINT64)
_FLOAT_FIELDS = (FieldDescriptor.CPPTYPE_FLOAT, FieldDescriptor.CPPTYPE_DOUBLE)


def _coerce(field, value):
    """What int() / float() took before: 64.0 for an integer field, "0.8" for a float one."""
    if isinstance(value, list):
        return [_coerce(field, v) for v in value]
    try:
        if field.cpp_type in _INT_FIELDS and (isinstance(value, str) or isinstance(value, float) and value.is_integer()):
            return int(value)
        if field.cpp_type in _FLOAT_FIELDS and isinstance(value, str):
            return float(value)
    except ValueError:
        pass            # left as it is: the assignment reports it, naming the field
    return value


def _read_adapter_dir(path: str | os.PathLike) -> list[tuple[str, bytes]]:
    d = pathlib.Path(path)
    if not d.is_dir():
        raise InvalidArgument(f"{d}: not a directory (expected a PEFT adapter folder)")
    cfg, weights = d / CONFIG_FILE, d / WEIGHTS_FILE
    if not cfg.is_file():
        raise InvalidArgument(f"{d}: missing {CONFIG_FILE}")
    if not weights.is_file():
        if any((d / n).exists() for n in ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")):
            raise InvalidArgument(f"{d}: pickled weights (adapter_model.bin) are not accepted; "
                                  f"convert them to {WEIGHTS_FILE}")
        raise InvalidArgument(f"{d}: missing {WEIGHTS_FILE}")
    return [(CONFIG_FILE, cfg.read_bytes()), (WEIGHTS_FILE, weights.read_bytes())]


def _register_messages(adapter_id: str, files: list[tuple[str, bytes]], base_model: str, replace: bool,
                       chunk_bytes: int, bar: "_Progress | None") -> Iterator[pb.RegisterAdapterRequest]:
    weights = dict(files).get(WEIGHTS_FILE, b"")
    header = pb.RegisterAdapterHeader(adapter_id=adapter_id, base_model=base_model or "",
                                      sha256=hashlib.sha256(weights).hexdigest(), replace=bool(replace))
    yield pb.RegisterAdapterRequest(header=header)
    for name, data in files:
        for off in range(0, max(len(data), 1), chunk_bytes):
            piece = data[off:off + chunk_bytes]
            yield pb.RegisterAdapterRequest(chunk=pb.FileChunk(filename=name, data=piece))
            if bar is not None:
                bar.update(len(piece))
    if bar is not None:
        bar.close()


def _synthetic_header(adapter_id: str, rank: int, target_modules: Sequence[str] | str, seed: int,
                      base_model: str, alpha: float, replace: bool) -> pb.RegisterAdapterRequest:
    if isinstance(target_modules, str):
        target_modules = [t for t in target_modules.split(",") if t]
    spec = _pb(pb.SyntheticSpec, rank=rank, target_modules=list(target_modules), seed=seed, alpha=alpha or 0.0)
    return pb.RegisterAdapterRequest(header=pb.RegisterAdapterHeader(
        adapter_id=adapter_id, base_model=base_model or "", replace=bool(replace), synthetic=spec))


def _fetch_collect(messages: Iterable[pb.AdapterChunk]) -> FetchedAdapter:
    info, files = None, {}
    for m in messages:
        _fetch_add(m, files)
        if m.HasField("info"):
            info = AdapterInfo.from_pb(m.info)
    return FetchedAdapter(info=info or AdapterInfo(""), files=files)


def _fetch_add(m: pb.AdapterChunk, files: dict[str, bytearray]) -> None:
    if m.HasField("chunk"):
        files.setdefault(m.chunk.filename, bytearray()).extend(m.chunk.data)


# ---------------------------------------------------------------------------------------- progress

class _Progress:
    """tqdm when installed, else a one-line stderr bar; nothing when stderr is not a TTY."""

    def __init__(self, total: int, desc: str):
        self.total, self.desc, self.done, self._tqdm = total, desc, 0, None
        try:
            from tqdm import tqdm  # noqa: PLC0415
            self._tqdm = tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                              file=sys.stderr, leave=False)
        except ImportError:
            self._draw()

    def update(self, n: int) -> None:
        self.done += n
        if self._tqdm is not None:
            self._tqdm.update(n)
        else:
            self._draw()

    def _draw(self) -> None:
        frac = self.done / self.total if self.total else 1.0
        width = 30
        fill = int(frac * width)
        sys.stderr.write(f"\r{self.desc} [{'#' * fill}{'.' * (width - fill)}] {frac * 100:5.1f}% "
                         f"{self.done / 1e6:.1f}/{self.total / 1e6:.1f} MB")
        sys.stderr.flush()

    def close(self) -> None:
        if self._tqdm is not None:
            self._tqdm.close()
        else:
            sys.stderr.write("\r" + " " * 80 + "\r")
            sys.stderr.flush()


def _progress(enabled: bool, total: int, desc: str) -> _Progress | None:
    if not enabled:
        return None
    try:
        tty = sys.stderr.isatty()
    except (AttributeError, ValueError):
        tty = False
    return _Progress(total, desc) if tty else None


# ---------------------------------------------------------------------------------------- retries

@dataclass
class RetryPolicy:
    """Exponential backoff for safe RPCs: attempt k waits min(max_backoff, initial * multiplier**k)
    times a random factor in [0.5, 1]."""
    max_attempts: int = 4
    initial_backoff: float = 0.1
    max_backoff: float = 2.0
    multiplier: float = 2.0
    retry_codes: tuple = (grpc.StatusCode.UNAVAILABLE,)

    def delay(self, attempt: int) -> float:
        return min(self.max_backoff, self.initial_backoff * self.multiplier ** attempt) * random.uniform(0.5, 1.0)


NO_RETRY = RetryPolicy(max_attempts=1)


def _remaining(deadline: float | None) -> float | None:
    if deadline is None:
        return None
    return max(0.0, deadline - time.monotonic())


def _channel_options(options: Sequence[tuple] | None) -> list[tuple]:
    base = [("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES)]
    return base + list(options or [])


class _Base:
    def __init__(self, target: str | None = None, token: str | None = None, timeout: float | None = None,
                 *, store_target: str | None = None, retry: RetryPolicy | None = None,
                 credentials: grpc.ChannelCredentials | None = None, options: Sequence[tuple] | None = None):
        self.target = target or os.environ.get("LORASERVE_TARGET") or DEFAULT_TARGET
        # AdapterStore RPCs go here when the store runs as its own service (docker compose)
        self.store_target = store_target or self.target
        self.token = token if token is not None else (os.environ.get("LORASERVE_TOKEN") or None)
        self.timeout = timeout
        self.retry = retry or RetryPolicy()
        self._credentials = credentials
        self._options = _channel_options(options)

    def _metadata(self) -> tuple | None:
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def _deadline(self, timeout: float | None) -> float | None:
        t = self.timeout if timeout is None else timeout
        return None if t is None else time.monotonic() + t

    def _stubs(self, channel, store_channel=None) -> None:
        self._inference = pb_grpc.InferenceStub(channel)
        self._store = pb_grpc.AdapterStoreStub(store_channel or channel)
        self._admin = pb_grpc.EngineAdminStub(channel)
        self._health = health_pb2_grpc.HealthStub(channel) if health_pb2_grpc else None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.target!r})"


# ---------------------------------------------------------------------------------------- sync

class Client(_Base):
    """Blocking client. ``timeout`` (seconds) is the default deadline of every call; each method
    also takes ``timeout=``. ``token`` is sent as ``authorization: Bearer <token>``.
    ``store_target``: where AdapterStore RPCs go when the store is a separate service
    (default: ``target``, the embedded store of ``loraserve serve``)."""

    def __init__(self, target: str | None = None, token: str | None = None, timeout: float | None = None,
                 **kw):
        super().__init__(target, token, timeout, **kw)
        self.channel = self._open(self.target)
        self.store_channel = self._open(self.store_target) if self.store_target != self.target else None
        self._stubs(self.channel, self.store_channel)

    def _open(self, target: str) -> grpc.Channel:
        if self._credentials is not None:
            return grpc.secure_channel(target, self._credentials, options=self._options)
        return grpc.insecure_channel(target, options=self._options)

    def close(self) -> None:
        self.channel.close()
        if self.store_channel is not None:
            self.store_channel.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- plumbing
    def _unary(self, method, request, timeout: float | None, safe: bool):
        policy = self.retry if safe else NO_RETRY
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return method(request, timeout=_remaining(deadline), metadata=self._metadata())
            except grpc.RpcError as e:
                attempt += 1
                if e.code() not in policy.retry_codes or attempt >= policy.max_attempts:
                    raise error_from_rpc(e) from None
                pause = policy.delay(attempt - 1)
                left = _remaining(deadline)
                if left is not None and left <= pause:
                    raise error_from_rpc(e) from None
                time.sleep(pause)

    # -- data plane
    def generate(self, prompt: str | Sequence[int] | None = None, *, adapter_id: str = "",
                 prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 0,
                 temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                 stop: Sequence[str] | str | None = None, ignore_eos: bool = False, logprobs: bool = False,
                 request_id: str = "", timeout: float | None = None) -> Iterator[GenerateChunk]:
        """Stream a generation: yields ``GenerateChunk``s; the last has ``finished=True``.
        Closing the iterator early cancels the request on the server."""
        req = build_generate_request(prompt, prompt_token_ids=prompt_token_ids, adapter_id=adapter_id,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                     logprobs=logprobs, request_id=request_id)
        return self._generate(req, timeout)

    def _generate(self, req: pb.GenerateRequest, timeout: float | None) -> Iterator[GenerateChunk]:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._inference.Generate(req, timeout=_remaining(deadline), metadata=self._metadata())
            started = False
            try:
                for m in call:
                    started = True
                    yield _chunk_from_pb(m)
                return
            except grpc.RpcError as e:
                attempt += 1
                # Retry only when the stream never produced a message (the server did not start it).
                if started or e.code() not in self.retry.retry_codes or attempt >= self.retry.max_attempts:
                    raise error_from_rpc(e) from None
                pause = self.retry.delay(attempt - 1)
                left = _remaining(deadline)
                if left is not None and left <= pause:
                    raise error_from_rpc(e) from None
                time.sleep(pause)
            finally:
                call.cancel()

    def complete(self, prompt: str | Sequence[int] | None = None, **kw) -> Completion:
        """``generate`` joined into one ``Completion`` (same arguments)."""
        j = _Joiner()
        for c in self.generate(prompt, **kw):
            j.add(c)
        return j.result()

    # -- adapter store
    def register_adapter(self, path: str | os.PathLike, adapter_id: str, base_model: str = "",
                         replace: bool = False, progress: bool = True, *,
                         chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float | None = None) -> AdapterInfo:
        """Upload a PEFT folder (adapter_config.json + adapter_model.safetensors). Not retried."""
        files = _read_adapter_dir(path)
        bar = _progress(progress, sum(len(d) for _, d in files), f"register {adapter_id}")
        msgs = _register_messages(adapter_id, files, base_model, replace, chunk_bytes, bar)
        try:
            info = self._store.RegisterAdapter(msgs, timeout=_remaining(self._deadline(timeout)),
                                               metadata=self._metadata())
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            if bar is not None:
                bar.close()
        return AdapterInfo.from_pb(info)

    def register_synthetic(self, adapter_id: str, rank: int, target_modules: Sequence[str] | str = ("q_proj", "v_proj"),
                           seed: int = 0, base_model: str = "", alpha: float = 0.0, replace: bool = False, *,
                           timeout: float | None = None) -> AdapterInfo:
        """Register a synthetic adapter (weights generated by the store from the spec). Not retried."""
        msg = _synthetic_header(adapter_id, rank, target_modules, seed, base_model, alpha, replace)
        try:
            info = self._store.RegisterAdapter(iter([msg]), timeout=_remaining(self._deadline(timeout)),
                                               metadata=self._metadata())
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return AdapterInfo.from_pb(info)

    def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_pb(self._unary(self._store.GetAdapter, pb.GetAdapterRequest(adapter_id=adapter_id),
                                               timeout, safe=True))

    def list_adapters(self, base_model: str = "", page_size: int = 0, *,
                      timeout: float | None = None) -> Iterator[AdapterInfo]:
        """Every adapter (all pages), optionally only those of ``base_model``."""
        token = ""
        while True:
            resp = self._unary(self._store.ListAdapters,
                               _pb(pb.ListAdaptersRequest, base_model=base_model, page_size=page_size,
                                   page_token=token), timeout, safe=True)
            for a in resp.adapters:
                yield AdapterInfo.from_pb(a)
            token = resp.next_page_token
            if not token:
                return

    def list_engines(self, base_model: str = "", *, timeout: float | None = None) -> list[pb.EngineInfo]:
        """The engines heartbeating to this store (address, model, load, resident adapters)."""
        return list(self._unary(self._store.ListEngines, pb.ListEnginesRequest(base_model=base_model),
                                timeout, safe=True).engines)

    def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        return self._unary(self._store.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id),
                           timeout, safe=False).deleted

    def fetch_adapter(self, adapter_id: str, *, timeout: float | None = None) -> FetchedAdapter:
        """The adapter's record and files (FetchAdapter). Retried on UNAVAILABLE."""
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                call = self._store.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id),
                                                timeout=_remaining(deadline), metadata=self._metadata())
                out = _fetch_collect(call)
                out.files = {k: bytes(v) for k, v in out.files.items()}
                return out
            except grpc.RpcError as e:
                attempt += 1
                if e.code() not in self.retry.retry_codes or attempt >= self.retry.max_attempts:
                    raise error_from_rpc(e) from None
                time.sleep(self.retry.delay(attempt - 1))

    # -- engine admin
    def load_adapter(self, adapter_id: str, *, host_only: bool = False, timeout: float | None = None) -> LoadResult:
        """Warm an adapter: into the engine's GPU pool, or with host_only into its host cache."""
        r = self._unary(self._admin.LoadAdapter, pb.LoadAdapterRequest(adapter_id=adapter_id, host_only=host_only),
                        timeout, safe=False)
        return LoadResult(r.loaded, r.pages)

    def unload_adapter(self, adapter_id: str, *, keep_host: bool = False, timeout: float | None = None) -> bool:
        """Evict from the GPU pool (and, unless keep_host, from the host cache)."""
        return self._unary(self._admin.UnloadAdapter, pb.UnloadAdapterRequest(adapter_id=adapter_id, keep_host=keep_host),
                           timeout, safe=False).unloaded

    def stats(self, *, timeout: float | None = None) -> EngineStats:
        return EngineStats.from_pb(self._unary(self._admin.GetStats, pb.GetStatsRequest(), timeout, safe=True))

    def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The grpc.health.v1 status name: "SERVING", "NOT_SERVING", "SERVICE_UNKNOWN", ..."""
        if self._health is None:
            raise Unimplemented("grpcio-health-checking is not installed")
        r = self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, safe=True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Block until the channel connects (or raise Unavailable)."""
        try:
            grpc.channel_ready_future(self.channel).result(timeout=timeout)
        except grpc.FutureTimeoutError:
            raise Unavailable(f"{self.target}: not reachable within {timeout:g}s") from None


# ---------------------------------------------------------------------------------------- async

class AsyncClient(_Base):
    """asyncio client over ``grpc.aio``; the same methods as ``Client``, as coroutines
    (``generate`` and ``list_adapters`` are async iterators). Create it inside a running loop."""

    def __init__(self, target: str | None = None, token: str | None = None, timeout: float | None = None,
                 **kw):
        super().__init__(target, token, timeout, **kw)
        self.channel = self._open(self.target)
        self.store_channel = self._open(self.store_target) if self.store_target != self.target else None
        self._stubs(self.channel, self.store_channel)

    def _open(self, target: str) -> grpc.aio.Channel:
        if self._credentials is not None:
            return grpc.aio.secure_channel(target, self._credentials, options=self._options)
        return grpc.aio.insecure_channel(target, options=self._options)

    async def close(self) -> None:
        await self.channel.close()
        if self.store_channel is not None:
            await self.store_channel.close()

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def _unary(self, method, request, timeout: float | None, safe: bool):
        policy = self.retry if safe else NO_RETRY
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                return await method(request, timeout=_remaining(deadline), metadata=self._metadata())
            except grpc.RpcError as e:
                attempt += 1
                if e.code() not in policy.retry_codes or attempt >= policy.max_attempts:
                    raise error_from_rpc(e) from None
                pause = policy.delay(attempt - 1)
                left = _remaining(deadline)
                if left is not None and left <= pause:
                    raise error_from_rpc(e) from None
                await asyncio.sleep(pause)

    async def generate(self, prompt: str | Sequence[int] | None = None, *, adapter_id: str = "",
                       prompt_token_ids: Sequence[int] | None = None, max_new_tokens: int = 0,
                       temperature: float = 0.0, top_p: float = 0.0, top_k: int = 0, seed: int | None = None,
                       stop: Sequence[str] | str | None = None, ignore_eos: bool = False, logprobs: bool = False,
                       request_id: str = "", timeout: float | None = None) -> AsyncIterator[GenerateChunk]:
        """Async iterator of ``GenerateChunk``s (see ``Client.generate``)."""
        req = build_generate_request(prompt, prompt_token_ids=prompt_token_ids, adapter_id=adapter_id,
                                     max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                                     top_k=top_k, seed=seed, stop=stop, ignore_eos=ignore_eos,
                                     logprobs=logprobs, request_id=request_id)
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            call = self._inference.Generate(req, timeout=_remaining(deadline), metadata=self._metadata())
            started = False
            try:
                async for m in call:
                    started = True
                    yield _chunk_from_pb(m)
                return
            except grpc.RpcError as e:
                attempt += 1
                if started or e.code() not in self.retry.retry_codes or attempt >= self.retry.max_attempts:
                    raise error_from_rpc(e) from None
                pause = self.retry.delay(attempt - 1)
                left = _remaining(deadline)
                if left is not None and left <= pause:
                    raise error_from_rpc(e) from None
                await asyncio.sleep(pause)
            finally:
                call.cancel()

    async def complete(self, prompt: str | Sequence[int] | None = None, **kw) -> Completion:
        j = _Joiner()
        async for c in self.generate(prompt, **kw):
            j.add(c)
        return j.result()

    async def register_adapter(self, path: str | os.PathLike, adapter_id: str, base_model: str = "",
                               replace: bool = False, progress: bool = True, *,
                               chunk_bytes: int = DEFAULT_CHUNK_BYTES, timeout: float | None = None) -> AdapterInfo:
        files = _read_adapter_dir(path)
        bar = _progress(progress, sum(len(d) for _, d in files), f"register {adapter_id}")
        msgs = _register_messages(adapter_id, files, base_model, replace, chunk_bytes, bar)

        async def agen():
            for m in msgs:
                yield m

        try:
            info = await self._store.RegisterAdapter(agen(), timeout=_remaining(self._deadline(timeout)),
                                                     metadata=self._metadata())
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        finally:
            if bar is not None:
                bar.close()
        return AdapterInfo.from_pb(info)

    async def register_synthetic(self, adapter_id: str, rank: int,
                                 target_modules: Sequence[str] | str = ("q_proj", "v_proj"), seed: int = 0,
                                 base_model: str = "", alpha: float = 0.0, replace: bool = False, *,
                                 timeout: float | None = None) -> AdapterInfo:
        msg = _synthetic_header(adapter_id, rank, target_modules, seed, base_model, alpha, replace)

        async def agen():
            yield msg

        try:
            info = await self._store.RegisterAdapter(agen(), timeout=_remaining(self._deadline(timeout)),
                                                     metadata=self._metadata())
        except grpc.RpcError as e:
            raise error_from_rpc(e) from None
        return AdapterInfo.from_pb(info)

    async def get_adapter(self, adapter_id: str, *, timeout: float | None = None) -> AdapterInfo:
        return AdapterInfo.from_pb(await self._unary(self._store.GetAdapter,
                                                      pb.GetAdapterRequest(adapter_id=adapter_id), timeout, True))

    async def list_adapters(self, base_model: str = "", page_size: int = 0, *,
                            timeout: float | None = None) -> AsyncIterator[AdapterInfo]:
        token = ""
        while True:
            resp = await self._unary(self._store.ListAdapters,
                                     _pb(pb.ListAdaptersRequest, base_model=base_model, page_size=page_size,
                                         page_token=token), timeout, True)
            for a in resp.adapters:
                yield AdapterInfo.from_pb(a)
            token = resp.next_page_token
            if not token:
                return

    async def list_engines(self, base_model: str = "", *, timeout: float | None = None) -> list[pb.EngineInfo]:
        return list((await self._unary(self._store.ListEngines, pb.ListEnginesRequest(base_model=base_model),
                                       timeout, True)).engines)

    async def delete_adapter(self, adapter_id: str, *, timeout: float | None = None) -> bool:
        return (await self._unary(self._store.DeleteAdapter, pb.DeleteAdapterRequest(adapter_id=adapter_id),
                                  timeout, False)).deleted

    async def fetch_adapter(self, adapter_id: str, *, timeout: float | None = None) -> FetchedAdapter:
        deadline = self._deadline(timeout)
        attempt = 0
        while True:
            try:
                call = self._store.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id),
                                                timeout=_remaining(deadline), metadata=self._metadata())
                info, files = None, {}
                async for m in call:
                    _fetch_add(m, files)
                    if m.HasField("info"):
                        info = AdapterInfo.from_pb(m.info)
                return FetchedAdapter(info=info or AdapterInfo(""), files={k: bytes(v) for k, v in files.items()})
            except grpc.RpcError as e:
                attempt += 1
                if e.code() not in self.retry.retry_codes or attempt >= self.retry.max_attempts:
                    raise error_from_rpc(e) from None
                await asyncio.sleep(self.retry.delay(attempt - 1))

    async def load_adapter(self, adapter_id: str, *, host_only: bool = False,
                           timeout: float | None = None) -> LoadResult:
        r = await self._unary(self._admin.LoadAdapter,
                              pb.LoadAdapterRequest(adapter_id=adapter_id, host_only=host_only), timeout, False)
        return LoadResult(r.loaded, r.pages)

    async def unload_adapter(self, adapter_id: str, *, keep_host: bool = False,
                             timeout: float | None = None) -> bool:
        return (await self._unary(self._admin.UnloadAdapter,
                                  pb.UnloadAdapterRequest(adapter_id=adapter_id, keep_host=keep_host),
                                  timeout, False)).unloaded

    async def stats(self, *, timeout: float | None = None) -> EngineStats:
        return EngineStats.from_pb(await self._unary(self._admin.GetStats, pb.GetStatsRequest(), timeout, True))

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        if self._health is None:
            raise Unimplemented("grpcio-health-checking is not installed")
        r = await self._unary(self._health.Check, health_pb2.HealthCheckRequest(service=service), timeout, True)
        return health_pb2.HealthCheckResponse.ServingStatus.Name(r.status)

    async def wait_ready(self, timeout: float = 30.0) -> None:
        try:
            await asyncio.wait_for(self.channel.channel_ready(), timeout)
        except asyncio.TimeoutError:
            raise Unavailable(f"{self.target}: not reachable within {timeout:g}s") from None
