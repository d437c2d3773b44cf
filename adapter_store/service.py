"""loraserve.v1.AdapterStore: the control-plane servicer (grpc.aio).

Blocking Redis and object-store calls run on the store's own threads (`_POOL`), as does validation
(torch releases the GIL for most of it), so the event loop that also serves the engine's RPCs
never stalls. Redis or object store down: UNAVAILABLE, and the next call after they return
works again (redis-py reconnects by itself; the S3 client too).
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import hashlib
import hmac
import logging
import os
import pathlib
import threading
import time
from typing import AsyncIterator, Iterator

import grpc

from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc

from .errors import Aborted, DataLoss, InvalidArgument, NotFound, ResourceExhausted, StoreError, Unauthenticated, \
    Unavailable
from .metadata import REDIS_ERRORS, Metadata
from .objstore import CHUNK, BlobNotFound, InvalidKey, ObjectStore, ObjectStoreUnavailable, open_store
from .synthetic import synthetic_config, synthetic_size, synthetic_weight_chunks
from .validate import (CONFIG_FILE, WEIGHTS_FILE, BaseDims, Limits, SyntheticParams, check_filename, check_sha256,
                       precheck, validate_adapter, validate_adapter_id, validate_base_model, validate_synthetic)

__all__ = ["AdapterStoreServicer", "build_store", "record_to_info"]

log = logging.getLogger("loraserve.store")


def _backend_errors() -> tuple:
    errs = REDIS_ERRORS + (ObjectStoreUnavailable,)
    try:
        import botocore.exceptions as be
        errs += (be.BotoCoreError, be.ClientError)
    except ImportError:
        pass
    import redis
    errs += (redis.exceptions.LockError,)
    return errs


_BACKEND_ERRORS = _backend_errors()


def record_to_info(rec: dict) -> pb.AdapterInfo:
    return pb.AdapterInfo(adapter_id=rec["adapter_id"], base_model=rec["base_model"], rank=rec["rank"],
                          alpha=rec["alpha"], target_modules=rec["target_modules"], size_bytes=rec["size_bytes"],
                          sha256=rec["sha256"], created_at=rec["created_at"], use_rslora=rec["use_rslora"],
                          version=rec["version"], synthetic=bool(rec["synthetic"]))


# The store's blocking work (Redis, object storage, validation) runs on threads of its own, not
# the event loop's default executor: embedded in `serve`, the engine's servicers call this store
# from threads of that process, and on one shared pool they could take every thread its
# handlers need (a deadlock until their calls time out).
_POOL = concurrent.futures.ThreadPoolExecutor(32, thread_name_prefix="loraserve-store")


async def _thread(fn, *args, **kw):
    return await asyncio.get_running_loop().run_in_executor(_POOL, functools.partial(fn, *args, **kw))


async def _run(fn, *args, **kw):
    """fn in a store thread; backend failures become Unavailable."""
    try:
        return await _thread(fn, *args, **kw)
    except StoreError:
        raise
    except InvalidKey as e:
        raise InvalidArgument(str(e)) from None
    except _BACKEND_ERRORS as e:
        raise Unavailable(f"{_which(e)} unavailable: {e}") from None


def _which(e: Exception) -> str:
    return "redis" if isinstance(e, REDIS_ERRORS) else "object store"


class AdapterStoreServicer(pb_grpc.AdapterStoreServicer):
    """The AdapterStore service over a Metadata (Redis) and an ObjectStore (blobs)."""

    def __init__(self, meta: Metadata, blobs: ObjectStore, token: str | None = None, limits: Limits = Limits(),
                 chunk_bytes: int = CHUNK):
        self.meta = meta
        self.blobs = blobs
        if meta.blobs is None:
            meta.blobs = blobs
        self.token = token or None
        self.limits = limits
        self.chunk_bytes = chunk_bytes
        self._sweeper: threading.Thread | None = None

    # ------------------------------------------------------------------ helpers
    def _check_auth(self, context) -> None:
        if not self.token:
            return
        md = dict(context.invocation_metadata() or ())
        got = md.get("authorization", "")
        if isinstance(got, bytes):
            got = got.decode(errors="replace")
        want = f"Bearer {self.token}"
        if not hmac.compare_digest(got.encode(), want.encode()):
            raise Unauthenticated("missing or wrong 'authorization: Bearer <token>' metadata")

    async def _abort(self, context, e: StoreError):
        await context.abort(e.code, e.message)

    async def _dims(self, base_model: str) -> tuple[str, BaseDims]:
        if not base_model:
            models = await _run(self.meta.base_models)
            if len(models) == 1:
                name = next(iter(models))
                return name, models[name]
            raise InvalidArgument(f"header.base_model is required (registered base models: {sorted(models)})")
        validate_base_model(base_model)
        dims = await _run(self.meta.base_model, base_model)
        if dims is None:
            models = await _run(self.meta.base_models)
            raise InvalidArgument(f"header.base_model {base_model!r} is not registered with the store "
                                  f"(registered: {sorted(models)})")
        return base_model, dims

    # ------------------------------------------------------------------ RPCs
    async def RegisterAdapter(self, request_iterator, context):
        try:
            self._check_auth(context)
            return await self._register(request_iterator)
        except StoreError as e:
            await self._abort(context, e)

    async def _register(self, request_iterator) -> pb.AdapterInfo:
        t0 = time.perf_counter()
        it = request_iterator.__aiter__()
        try:
            first = await it.__anext__()
        except StopAsyncIteration:
            raise InvalidArgument("header is required: the first message must carry RegisterAdapterHeader") from None
        if first.WhichOneof("kind") != "header":
            raise InvalidArgument("header is required: the first message must carry RegisterAdapterHeader")
        h = first.header
        adapter_id = validate_adapter_id(h.adapter_id, "header.adapter_id")
        expected_sha = check_sha256(h.sha256)
        base_model, dims = await self._dims(h.base_model)
        if not h.replace and await _run(self.meta.exists, adapter_id):
            raise _exists(adapter_id)

        files: dict[str, list[bytes]] = {CONFIG_FILE: [], WEIGHTS_FILE: []}
        hasher = hashlib.sha256()
        sizes = {CONFIG_FILE: 0, WEIGHTS_FILE: 0}
        caps = {CONFIG_FILE: self.limits.max_config_bytes, WEIGHTS_FILE: self.limits.max_weights_bytes}
        async for msg in it:
            kind = msg.WhichOneof("kind")
            if kind == "header":
                raise InvalidArgument("header was sent twice: only the first message may carry a header")
            if kind != "chunk":
                raise InvalidArgument("message carries neither header nor chunk")
            if h.HasField("synthetic"):
                raise InvalidArgument("header.synthetic is set, so no chunks may follow")
            name = check_filename(msg.chunk.filename)
            sizes[name] += len(msg.chunk.data)
            if sizes[name] > caps[name]:
                raise ResourceExhausted(f"{name} exceeds the store's size limit of {caps[name]} bytes")
            files[name].append(msg.chunk.data)
            if name == WEIGHTS_FILE:
                hasher.update(msg.chunk.data)

        if h.HasField("synthetic"):
            s = h.synthetic
            if expected_sha:
                raise InvalidArgument("header.sha256 cannot be given for a synthetic adapter")
            spec = validate_synthetic(s.rank, list(s.target_modules), s.seed, s.alpha, dims, self.limits)
            rec = await _run(self.meta.register, adapter_id, base_model, rank=spec.rank, alpha=spec.alpha,
                             target_modules=list(spec.target_modules), use_rslora=False,
                             size_bytes=synthetic_size(spec, dims), sha256="",
                             config=synthetic_config(spec, base_model), weights=None,
                             synthetic=spec.to_json(), replace=h.replace)
            return record_to_info(rec)

        config, weights = await _thread(lambda: (b"".join(files[CONFIG_FILE]), b"".join(files[WEIGHTS_FILE])))
        files.clear()
        digest = hasher.hexdigest()
        t1 = time.perf_counter()
        if expected_sha and expected_sha != digest:
            raise InvalidArgument(f"header.sha256 mismatch: {WEIGHTS_FILE} has sha256 {digest}, header says "
                                  f"{expected_sha}")
        # sizes, config and safetensors header first: a malformed upload never reaches the object store
        await _thread(precheck, config, weights, self.limits)
        timing = {}

        def check() -> dict:
            t = time.perf_counter()
            v = validate_adapter(adapter_id, config, weights, dims, self.limits, expected_sha, digest)
            timing["validate"] = time.perf_counter() - t
            return {"rank": v.rank, "alpha": v.alpha, "target_modules": v.target_modules, "use_rslora": v.use_rslora,
                    "size_bytes": v.size_bytes}

        # the blob write overlaps validation; the record is only written once both succeeded
        rec = await _run(self.meta.register, adapter_id, base_model, sha256=digest, config=config, weights=weights,
                         replace=h.replace, check=check)
        t3 = time.perf_counter()
        log.info("registered adapter %s (base %s, r=%d, %d bytes, version %d): receive %.3fs, validate %.3fs, "
                 "validate+blob+commit %.3fs", adapter_id, base_model, rec["rank"], rec["size_bytes"], rec["version"],
                 t1 - t0, timing.get("validate", 0.0), t3 - t1)
        return record_to_info(rec)

    async def GetAdapter(self, request, context):
        try:
            return record_to_info(await self._get(request.adapter_id))
        except StoreError as e:
            await self._abort(context, e)

    async def _get(self, adapter_id: str) -> dict:
        validate_adapter_id(adapter_id)
        rec = await _run(self.meta.get, adapter_id)
        if rec is None:
            raise NotFound(f"adapter {adapter_id!r} not found")
        return rec

    async def ListAdapters(self, request, context):
        try:
            if request.base_model:
                validate_base_model(request.base_model)
            recs, token = await _run(self.meta.list, request.base_model, request.page_size, request.page_token)
            return pb.ListAdaptersResponse(adapters=[record_to_info(r) for r in recs], next_page_token=token)
        except StoreError as e:
            await self._abort(context, e)

    async def ListEngines(self, request, context):
        """The engines heartbeating to this store's Redis (clients route by it: clients/router.py)."""
        try:
            engines = await _run(self.meta.engines)
            now = time.time()
            return pb.ListEnginesResponse(engines=[
                pb.EngineInfo(engine_id=e["engine_id"], address=e["address"], base_model=e.get("base_model", ""),
                              running=e.get("running", 0), waiting=e.get("waiting", 0),
                              resident_adapter_ids=e["resident_ids"], heartbeat_age_s=max(0.0, now - e["ts"]))
                for e in engines if not request.base_model or e.get("base_model") == request.base_model])
        except StoreError as e:
            await self._abort(context, e)

    async def DeleteAdapter(self, request, context):
        try:
            self._check_auth(context)
            validate_adapter_id(request.adapter_id)
            out = await _run(self.meta.delete, request.adapter_id)
            if out is None:
                raise NotFound(f"adapter {request.adapter_id!r} not found")
            log.info("deleted adapter %s (version %d)", request.adapter_id, out["version"])
            return pb.DeleteAdapterResponse(deleted=True)
        except StoreError as e:
            await self._abort(context, e)

    async def FetchAdapter(self, request, context):
        try:
            rec = await self._get(request.adapter_id)
            yield pb.AdapterChunk(info=record_to_info(rec))
            config = rec["config"]
            for i in range(0, len(config), self.chunk_bytes):
                yield pb.AdapterChunk(chunk=pb.FileChunk(filename=CONFIG_FILE, data=config[i:i + self.chunk_bytes]))
            async for data in self._weight_chunks(rec):
                yield pb.AdapterChunk(chunk=pb.FileChunk(filename=WEIGHTS_FILE, data=data))
        except StoreError as e:
            await self._abort(context, e)

    async def _weight_chunks(self, rec: dict) -> AsyncIterator[bytes]:
        if rec["synthetic"]:
            spec = SyntheticParams.from_json(rec["synthetic"])
            dims = await _run(self.meta.base_model, rec["base_model"])
            if dims is None:
                raise Unavailable(f"base model {rec['base_model']!r} of synthetic adapter {rec['adapter_id']!r} "
                                  f"is no longer registered")
            source: Iterator[bytes] = _rechunk(synthetic_weight_chunks(spec, dims), self.chunk_bytes)
        else:
            source = self.blobs.get(rec["blob"], self.chunk_bytes)
        try:
            async for data in _produce(source):
                yield data
        except BlobNotFound:
            now = await _run(self.meta.get, rec["adapter_id"])
            if now is None or now["version"] != rec["version"]:
                raise Aborted(f"adapter {rec['adapter_id']!r} was replaced or deleted during the fetch; "
                              f"retry") from None
            raise DataLoss(f"blob {rec['blob']} of adapter {rec['adapter_id']!r} is missing") from None

    # ------------------------------------------------------------------ maintenance
    def start_sweeper(self, interval_s: float = 3600.0, grace_s: float = 3600.0) -> threading.Thread:
        """A daemon thread that runs meta.sweep(grace_s) every interval_s (errors are logged)."""
        stop = threading.Event()

        def loop():
            while not stop.wait(interval_s):
                try:
                    gone = self.meta.sweep(grace_s)
                    if gone:
                        log.info("sweep deleted %d orphan blob(s)", len(gone))
                except Exception as e:
                    log.warning("sweep failed: %s", e)

        t = threading.Thread(target=loop, name="loraserve-sweep", daemon=True)
        t.stop = stop.set  # type: ignore[attr-defined]
        t.start()
        self._sweeper = t
        return t

    def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.stop()  # type: ignore[attr-defined]
        self.meta.close()


def _exists(adapter_id: str):
    from .errors import AlreadyExists
    return AlreadyExists(f"adapter {adapter_id!r} already exists; register it with replace set (CLI: --replace) to replace it")


async def _produce(source: Iterator[bytes], depth: int = 8) -> AsyncIterator[bytes]:
    """Iterate a blocking iterator in a producer thread, up to `depth` chunks ahead of the consumer
    (reading or generating the next chunks overlaps sending the current ones). Errors of the source
    are re-raised here, mapped like _run's; abandoning the iteration stops the producer."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue(depth)
    stop = threading.Event()
    done = object()

    def put(item) -> bool:
        while not stop.is_set():
            fut = asyncio.run_coroutine_threadsafe(q.put(item), loop)
            try:
                fut.result(0.5)
                return True
            except concurrent.futures.TimeoutError:
                fut.cancel()
            except (RuntimeError, concurrent.futures.CancelledError):  # loop closed / cancelled
                return False
        return False

    def produce() -> None:
        try:
            for data in source:
                if not put(bytes(data)):
                    return
            put(done)
        except BaseException as e:  # noqa: BLE001 (delivered to the consumer)
            put(e)
        finally:
            close = getattr(source, "close", None)
            if close is not None:
                try:
                    close()
                except Exception:
                    pass

    thread = threading.Thread(target=produce, name="loraserve-fetch", daemon=True)
    thread.start()
    try:
        while True:
            item = await q.get()
            if item is done:
                return
            if isinstance(item, BaseException):
                if isinstance(item, (StoreError, BlobNotFound)):
                    raise item
                if isinstance(item, _BACKEND_ERRORS):
                    raise Unavailable(f"{_which(item)} unavailable: {item}")
                raise item
            yield item
    finally:
        stop.set()


def _rechunk(source: Iterator, size: int) -> Iterator:
    """Re-cut a stream of buffers into pieces of exactly `size` bytes (the last may be shorter),
    slicing large buffers without copying them."""
    buf = bytearray()
    for b in source:
        mv = memoryview(b).cast("B")
        if buf:
            take = min(size - len(buf), len(mv))
            buf += mv[:take]
            mv = mv[take:]
            if len(buf) < size:
                continue
            yield bytes(buf)
            buf = bytearray()
        while len(mv) >= size:
            yield mv[:size]
            mv = mv[size:]
        buf += mv
    if buf:
        yield bytes(buf)


def build_store(redis_url: str, object_store: str | None, data_dir: str | os.PathLike, token: str | None = None,
                limits: Limits = Limits(), namespace: str = "loraserve") -> AdapterStoreServicer:
    """The servicer over Redis at redis_url and blobs at object_store (None: DATA_DIR/blobs)."""
    pathlib.Path(data_dir).mkdir(parents=True, exist_ok=True)
    blobs = open_store(object_store, data_dir)
    meta = Metadata(redis_url, blobs=blobs, namespace=namespace)
    return AdapterStoreServicer(meta, blobs, token=token, limits=limits)
