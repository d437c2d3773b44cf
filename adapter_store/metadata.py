"""Adapter metadata in Redis (redis-py, blocking: call from a thread when on an event loop).

Keys (namespace NS, default "loraserve"):
  NS:adapter:<id>          hash: the adapter record (only ever written whole, by one Lua script)
  NS:index                 sorted set (all scores 0, lexicographic) of ready adapter ids
  NS:index:bm:<base>       the same, per base model (ListAdapters' filter)
  NS:base_models           hash: base model name -> JSON dims (ModelConfig.dims_dict())
  NS:versions              hash: adapter id -> its last version (versions never repeat, even after a delete)
  NS:blobref:<blob key>    set of adapter ids whose record references this blob
  NS:lock:blob:<blob key>  lock held while a blob is written+committed, or deleted
  NS:engines               set of engine ids; NS:engine:<id> JSON with a TTL (heartbeat)
  NS:events                pub/sub channel: {"type": "deleted"|"replaced", "adapter_id", "version"}

Registration is blob first, metadata last: the weights go to the object store under a content
address (blobs/sha256/<xx>/<sha256>), then one Lua script checks for an existing id, writes the
whole record with status=ready, indexes it, references the blob and publishes "replaced" where
it replaced one. A crash before the script leaves no record (at most a blob that `sweep()`
finds: no record references it); the script itself is atomic. Blobs are deleted only under
their lock once no record references them, so a concurrent registration of the same bytes
cannot lose its blob.
"""
from __future__ import annotations

import base64
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable

import redis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from .errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from .objstore import BlobNotFound, ObjectStore
from .validate import BaseDims

__all__ = ["Metadata", "subscribe_events", "EventSubscriber", "blob_key", "REDIS_ERRORS", "connect"]

log = logging.getLogger("loraserve.store")

REDIS_ERRORS = (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError,
                redis.exceptions.BusyLoadingError)
DEFAULT_PAGE = 100
MAX_PAGE = 1000


def connect(redis_url: str, **kw) -> redis.Redis:
    """A client that fails fast (about a second) while Redis is down and reconnects by itself after."""
    opts = dict(socket_connect_timeout=1.0, socket_timeout=10.0, health_check_interval=15,
                retry=Retry(ExponentialBackoff(cap=0.25, base=0.05), 2),
                retry_on_error=[redis.exceptions.ConnectionError, redis.exceptions.TimeoutError])
    opts.update(kw)
    return redis.Redis.from_url(redis_url, **opts)


def blob_key(sha256: str) -> str:
    return f"blobs/sha256/{sha256[:2]}/{sha256}"


# Each mutating script takes an operation key (KEYS[4], unique per call) and records its result
# there: redis-py retries a command whose reply was lost on a dropped connection, and the second
# run must report the first run's outcome rather than act again (a replace bumping the version
# twice, a committed register answering "exists", a delete answering "not found").
_ONCE = """
local done = redis.call('GET', KEYS[4])
if done then return cjson.decode(done) end
"""

_COMMIT = _ONCE + """
local rec, idx, chan = KEYS[1], KEYS[2], KEYS[3]
local id, replace, ns, bm, blob = ARGV[1], ARGV[2], ARGV[3], ARGV[4], ARGV[5]
local old_blob = ''
local existed = redis.call('EXISTS', rec)
-- versions never repeat for an id, across deletes too: a holder that missed an event still sees the change
local version = (tonumber(redis.call('HGET', ns .. ':versions', id)) or 0) + 1
if existed == 1 then
  if replace ~= '1' then return {'EXISTS', '', 0} end
  local old = redis.call('HMGET', rec, 'version', 'blob', 'base_model')
  version = math.max(version, (tonumber(old[1]) or 0) + 1)
  old_blob = old[2] or ''
  if old[3] then redis.call('ZREM', ns .. ':index:bm:' .. old[3], id) end
  if old_blob ~= '' then redis.call('SREM', ns .. ':blobref:' .. old_blob, id) end
  redis.call('DEL', rec)
end
local fields = {}
for i = 6, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('HSET', rec, unpack(fields))
redis.call('HSET', rec, 'version', tostring(version), 'status', 'ready')
redis.call('HSET', ns .. ':versions', id, tostring(version))
redis.call('ZADD', idx, 0, id)
redis.call('ZADD', ns .. ':index:bm:' .. bm, 0, id)
if blob ~= '' then redis.call('SADD', ns .. ':blobref:' .. blob, id) end
if existed == 1 then
  redis.call('PUBLISH', chan, cjson.encode({type = 'replaced', adapter_id = id, version = version}))
end
local result = {'OK', old_blob, version}
redis.call('SET', KEYS[4], cjson.encode(result), 'EX', 600)
return result
"""

_DELETE = _ONCE + """
local rec, idx, chan = KEYS[1], KEYS[2], KEYS[3]
local id, ns = ARGV[1], ARGV[2]
if redis.call('EXISTS', rec) == 0 then return {0, '', 0} end
local old = redis.call('HMGET', rec, 'version', 'blob', 'base_model')
local version = tonumber(old[1]) or 0
local blob = old[2] or ''
redis.call('DEL', rec)
redis.call('ZREM', idx, id)
if old[3] then redis.call('ZREM', ns .. ':index:bm:' .. old[3], id) end
if blob ~= '' then redis.call('SREM', ns .. ':blobref:' .. blob, id) end
redis.call('PUBLISH', chan, cjson.encode({type = 'deleted', adapter_id = id, version = version}))
local result = {1, blob, version}
redis.call('SET', KEYS[4], cjson.encode(result), 'EX', 600)
return result
"""

# The sweep's repair of blob references, in one step: a reference goes only if its record does
# not point at the blob at that moment (read and removal apart, a replace away from the blob and
# back in between lost a live reference, and the blob with it). Returns the references left.
_REPAIR = """
local refs, key, prefix = KEYS[1], ARGV[1], ARGV[2]
for _, aid in ipairs(redis.call('SMEMBERS', refs)) do
  if redis.call('HGET', prefix .. aid, 'blob') ~= key then redis.call('SREM', refs, aid) end
end
return redis.call('SCARD', refs)
"""

# Drop engine ids whose heartbeat key has expired, each only if it is still missing now.
_FORGET = """
for i = 2, #ARGV do
  if redis.call('EXISTS', ARGV[1] .. ARGV[i]) == 0 then redis.call('SREM', KEYS[1], ARGV[i]) end
end
return 0
"""


_LIST_FIELDS = ["id", "base_model", "rank", "alpha", "target_modules", "size_bytes", "sha256", "created_at",
                "use_rslora", "version", "status", "blob", "synthetic"]


def _s(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def decode_record(raw: dict) -> dict | None:
    """Redis hash -> typed record; None unless status is ready."""
    if not raw:
        return None
    h = {_s(k): v for k, v in raw.items() if v is not None}
    if _s(h.get("status", b"")) != "ready":
        return None
    return {
        "adapter_id": _s(h["id"]), "base_model": _s(h["base_model"]), "rank": int(h["rank"]),
        "alpha": float(h["alpha"]), "target_modules": json.loads(h["target_modules"]),
        "size_bytes": int(h["size_bytes"]), "sha256": _s(h.get("sha256", b"")),
        "created_at": int(h["created_at"]), "use_rslora": _s(h.get("use_rslora", b"0")) == "1",
        "version": int(h["version"]), "status": "ready", "blob": _s(h.get("blob", b"")),
        "config": bytes(h.get("config") or b""), "synthetic": _s(h.get("synthetic") or b""),
    }


class Metadata:
    """Adapter records, listing, base models, engine heartbeats, events; plus blob lifecycle.

    blobs: the object store holding weight blobs (None for engines that only heartbeat).
    """

    def __init__(self, redis_url: str, blobs: ObjectStore | None = None, namespace: str = "loraserve",
                 lock_timeout_s: float = 600.0, client: redis.Redis | None = None):
        self.redis_url = redis_url
        self.r = client or connect(redis_url)
        self.blobs = blobs
        self.ns = namespace
        self.lock_timeout_s = lock_timeout_s
        self._commit = self.r.register_script(_COMMIT)
        self._delete = self.r.register_script(_DELETE)
        self._repair = self.r.register_script(_REPAIR)
        self._forget = self.r.register_script(_FORGET)

    # ------------------------------------------------------------------ keys
    def k_rec(self, adapter_id: str) -> str:
        return f"{self.ns}:adapter:{adapter_id}"

    @property
    def k_index(self) -> str:
        return f"{self.ns}:index"

    def k_index_bm(self, base_model: str) -> str:
        return f"{self.ns}:index:bm:{base_model}"

    def k_blobref(self, blob: str) -> str:
        return f"{self.ns}:blobref:{blob}"

    def k_op(self) -> str:
        """A fresh operation key for one call of a mutating script (see _ONCE)."""
        return f"{self.ns}:op:{uuid.uuid4().hex}"

    def _once(self, script, keys: list, args: list):
        """Run a script whose last key is its operation key; drop that key once the reply is in
        (it only answers a resend, and expires by itself where this step never comes)."""
        out = script(keys=keys, args=args)
        try:
            self.r.delete(keys[-1])
        except REDIS_ERRORS:
            pass
        return out

    @property
    def events_channel(self) -> str:
        return f"{self.ns}:events"

    def ping(self) -> bool:
        return bool(self.r.ping())

    def close(self) -> None:
        self.r.close()

    # ------------------------------------------------------------------ base models
    def register_base_model(self, name: str, dims: dict) -> None:
        """Called by the engine at start: ModelConfig.dims_dict() of the model it serves."""
        from .validate import validate_base_model

        validate_base_model(name)
        BaseDims.from_dict(dims, name)
        self.r.hset(f"{self.ns}:base_models", name, json.dumps(dims, sort_keys=True))

    def base_model(self, name: str) -> BaseDims | None:
        raw = self.r.hget(f"{self.ns}:base_models", name)
        return BaseDims.from_dict(json.loads(raw), name) if raw else None

    def base_models(self) -> dict[str, BaseDims]:
        return {_s(k): BaseDims.from_dict(json.loads(v), _s(k))
                for k, v in self.r.hgetall(f"{self.ns}:base_models").items()}

    # ------------------------------------------------------------------ records
    def get(self, adapter_id: str) -> dict | None:
        return decode_record(self.r.hgetall(self.k_rec(adapter_id)))

    def exists(self, adapter_id: str) -> bool:
        return bool(self.r.exists(self.k_rec(adapter_id)))

    def _lock(self, blob: str, blocking_timeout: float | None = 60.0):
        return self.r.lock(f"{self.ns}:lock:blob:{blob}", timeout=self.lock_timeout_s,
                           blocking_timeout=blocking_timeout)

    def register(self, adapter_id: str, base_model: str, *, sha256: str, config: bytes, weights=None,
                 rank: int = 0, alpha: float = 0.0, target_modules: list[str] = (), use_rslora: bool = False,
                 size_bytes: int = 0, synthetic: str = "", replace: bool = False,
                 check: Callable[[], dict | None] | None = None) -> dict:
        """Blob first, record last. weights: bytes/iterable for a real adapter, None for a synthetic one.

        check: optional validation, run while the blob is being written (under the blob's lock); it
        may return a dict overriding rank/alpha/target_modules/use_rslora/size_bytes. If it raises,
        the blob is removed again (unless another record references it) and nothing is committed.
        Raises AlreadyExists (id taken and not replace); returns the committed record.
        """
        blob = blob_key(sha256) if weights is not None else ""
        fields = {"id": adapter_id, "base_model": base_model, "rank": rank, "alpha": float(alpha),
                  "target_modules": list(target_modules), "size_bytes": size_bytes,
                  "sha256": sha256, "created_at": int(time.time()), "use_rslora": use_rslora,
                  "blob": blob, "config": config, "synthetic": synthetic}
        keys = [self.k_rec(adapter_id), self.k_index, self.events_channel, self.k_op()]
        args = [adapter_id, "1" if replace else "0", self.ns, base_model, blob]

        def commit():
            enc = dict(fields, alpha=repr(float(fields["alpha"])),
                       target_modules=json.dumps(list(fields["target_modules"])),
                       use_rslora="1" if fields["use_rslora"] else "0")
            flat: list = []
            for k, v in enc.items():
                flat += [k, v]
            return self._once(self._commit, keys, args + flat)

        if not blob:
            if check is not None:
                fields.update(check() or {})
            status, old_blob, version = commit()
        else:
            if self.blobs is None:
                raise RuntimeError("Metadata has no object store for weight blobs")
            lock = self._lock(blob)
            if not lock.acquire():
                raise Unavailable(f"blob {blob} is locked by another writer; retry")
            try:
                put = None
                if not (self.r.scard(self.k_blobref(blob)) > 0 and self.blobs.exists(blob)):
                    put = _blob_pool().submit(self.blobs.put, blob, weights)
                try:
                    if check is not None:
                        fields.update(check() or {})   # validation overlaps the blob write
                    if put is not None:
                        put.result()                   # the blob is durable before the record exists
                except BaseException:
                    if put is not None:
                        wait([put])
                        self._drop_unreferenced(blob)
                    raise
                status, old_blob, version = commit()
            finally:
                _release(lock)
        status, old_blob = _s(status), _s(old_blob)
        if status == "EXISTS":
            if blob:
                self.maybe_delete_blob(blob)
            raise AlreadyExists(f"adapter {adapter_id!r} already exists; register it with replace set (CLI: --replace) to replace it")
        if old_blob and old_blob != blob:
            self.maybe_delete_blob(old_blob)
        rec = self.get(adapter_id)
        if rec is None:  # deleted between commit and read: report what we committed
            rec = dict(fields, adapter_id=adapter_id, version=int(version), status="ready",
                       alpha=float(fields["alpha"]), target_modules=list(fields["target_modules"]))
            rec.pop("id")
        return rec

    def delete(self, adapter_id: str) -> dict | None:
        """Remove the record (publishing "deleted") and, if no record references it any more, its blob.

        Returns {"version", "blob"} of what was deleted, or None if there was no such adapter.
        """
        found, blob, version = self._once(self._delete, [self.k_rec(adapter_id), self.k_index, self.events_channel,
                                                         self.k_op()], [adapter_id, self.ns])
        if not int(found):
            return None
        blob = _s(blob)
        if blob:
            try:
                self.maybe_delete_blob(blob)
            except Exception as e:  # the record is gone; sweep() removes the blob later
                log.warning("deleting blob %s of %s failed (sweep will retry): %s", blob, adapter_id, e)
        return {"version": int(version), "blob": blob}

    def _drop_unreferenced(self, blob: str) -> None:
        """With the blob's lock held: delete it if no record references it (errors: sweep retries)."""
        try:
            if self.r.scard(self.k_blobref(blob)) == 0:
                self.blobs.delete(blob)
        except Exception as e:
            log.warning("could not remove unreferenced blob %s (sweep will): %s", blob, e)

    def maybe_delete_blob(self, blob: str, blocking_timeout: float | None = 60.0) -> bool:
        """Delete the blob under its lock if no record references it. True if deleted."""
        if self.blobs is None:
            return False
        lock = self._lock(blob, blocking_timeout)
        if not lock.acquire():
            return False
        try:
            if self.r.scard(self.k_blobref(blob)) > 0:
                return False
            self.blobs.delete(blob)
            self.r.delete(self.k_blobref(blob))
            return True
        finally:
            _release(lock)

    def list(self, base_model: str = "", page_size: int = 0, page_token: str = "") -> tuple[list[dict], str]:
        """One page of ready adapters in id order; returns (records, next_page_token or "")."""
        if page_size < 0:
            raise InvalidArgument(f"page_size must be 0 (the default, {DEFAULT_PAGE}) or more, got {page_size}")
        n = page_size or DEFAULT_PAGE
        n = min(n, MAX_PAGE)
        start = "-"
        if page_token:
            try:
                last = base64.urlsafe_b64decode(page_token.encode() + b"=" * (-len(page_token) % 4)).decode()
                if not last:
                    raise ValueError
            except (ValueError, UnicodeDecodeError):
                raise InvalidArgument(f"page_token {page_token[:80]!r} is invalid") from None
            start = "(" + last
        idx = self.k_index_bm(base_model) if base_model else self.k_index
        records: list[dict] = []
        token = ""
        while len(records) < n:
            ids = self.r.zrangebylex(idx, start, "+", start=0, num=n - len(records) + 1)
            if not ids:
                break
            more = len(ids) > n - len(records)
            ids = ids[: n - len(records)]
            pipe = self.r.pipeline(transaction=False)
            for i in ids:
                pipe.hmget(self.k_rec(_s(i)), _LIST_FIELDS)  # not the config: pages stay small
            for vals in pipe.execute():
                rec = decode_record(dict(zip(_LIST_FIELDS, vals)))
                if rec is not None:  # deleted since the index read
                    records.append(rec)
            start = "(" + _s(ids[-1])
            if not more:
                break
            if len(records) >= n:
                token = base64.urlsafe_b64encode(_s(ids[-1]).encode()).decode().rstrip("=")
        return records, token

    # ------------------------------------------------------------------ sweep
    def sweep(self, grace_s: float = 3600.0) -> list[str]:
        """Delete orphan blobs (no record references them) older than grace_s, plus stale temp files."""
        if self.blobs is None:
            return []
        now = time.time()
        deleted = []
        self.blobs.cleanup_temp(grace_s)
        for info in list(self.blobs.list_info("blobs/")):
            if now - info.mtime < grace_s:
                continue
            # drop references whose record no longer points at this blob (repairs drift)
            left = self._repair(keys=[self.k_blobref(info.key)], args=[info.key, self.k_rec("")])
            if int(left) == 0 and self.maybe_delete_blob(info.key, blocking_timeout=0):
                deleted.append(info.key)
        return deleted

    # ------------------------------------------------------------------ engines
    def heartbeat(self, engine_id: str, address: str, resident_ids: Iterable[str], ttl_s: float = 15.0,
                  base_model: str = "", running: int = 0, waiting: int = 0) -> None:
        """An engine is alive at address, serves base_model with this many requests running and
        waiting, and holds these adapters in its pool; forgotten ttl_s after the last beat."""
        body = json.dumps({"engine_id": engine_id, "address": address, "resident_ids": sorted(resident_ids),
                           "base_model": base_model, "running": running, "waiting": waiting, "ts": time.time()})
        pipe = self.r.pipeline(transaction=True)
        pipe.set(f"{self.ns}:engine:{engine_id}", body, px=max(1, int(ttl_s * 1000)))
        pipe.sadd(f"{self.ns}:engines", engine_id)
        pipe.execute()

    def engines(self) -> list[dict]:
        """Live engines: [{"engine_id", "address", "resident_ids", "base_model", "running",
        "waiting", "ts"}], by engine_id."""
        ids = sorted(_s(i) for i in self.r.smembers(f"{self.ns}:engines"))
        if not ids:
            return []
        vals = self.r.mget([f"{self.ns}:engine:{i}" for i in ids])
        out, dead = [], []
        for i, v in zip(ids, vals):
            if v is None:
                dead.append(i)
            else:
                out.append(json.loads(v))
        if dead:   # only those still without a heartbeat (one may have beaten since the read)
            self._forget(keys=[f"{self.ns}:engines"], args=[f"{self.ns}:engine:", *dead])
        return out

    def engines_holding(self, adapter_id: str) -> list[dict]:
        return [e for e in self.engines() if adapter_id in e["resident_ids"]]

    def publish(self, event: dict) -> int:
        return self.r.publish(self.events_channel, json.dumps(event))


_POOL = None
_POOL_LOCK = threading.Lock()


def _blob_pool():
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="loraserve-blob")
        return _POOL


def _release(lock) -> None:
    try:
        lock.release()
    except redis.exceptions.LockError:
        pass  # expired; nothing to release
    except REDIS_ERRORS as e:  # Redis went away: the lock expires by itself
        log.warning("could not release %s: %s", lock.name, e)


class EventSubscriber(threading.Thread):
    """Calls callback(event_dict) for every message on NS:events; reconnects after Redis restarts.

    After a reconnect it calls callback({"type": "reconnected"}): events published while it was
    disconnected are lost, so a holder of adapters should re-check their versions (GetAdapter).
    """

    def __init__(self, redis_url: str, callback: Callable[[dict], None], namespace: str = "loraserve"):
        super().__init__(name="loraserve-events", daemon=True)
        self.redis_url = redis_url
        self.callback = callback
        self.channel = f"{namespace}:events"
        self._stop_ev = threading.Event()
        self.subscribed = threading.Event()   # set while subscribed
        self.connects = 0

    def stop(self, timeout: float | None = 5.0) -> None:
        self._stop_ev.set()
        if self.is_alive() and threading.current_thread() is not self:
            self.join(timeout)

    def run(self) -> None:
        backoff = 0.1
        while not self._stop_ev.is_set():
            client = pubsub = None
            try:
                client = redis.Redis.from_url(self.redis_url, socket_connect_timeout=1.0, socket_timeout=None,
                                              health_check_interval=5)
                pubsub = client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.channel)
                self.connects += 1
                self.subscribed.set()
                backoff = 0.1
                if self.connects > 1:
                    self._call({"type": "reconnected"})
                while not self._stop_ev.is_set():
                    msg = pubsub.get_message(timeout=0.25)
                    if msg and msg.get("type") == "message":
                        try:
                            ev = json.loads(msg["data"])
                        except (ValueError, TypeError):
                            log.warning("ignoring malformed event %r", msg["data"])
                            continue
                        self._call(ev)
            except REDIS_ERRORS + (OSError,) as e:
                self.subscribed.clear()
                log.debug("events subscriber disconnected: %s", e)
                self._stop_ev.wait(backoff)
                backoff = min(backoff * 2, 2.0)
            finally:
                self.subscribed.clear()
                for c in (pubsub, client):
                    try:
                        if c is not None:
                            c.close()
                    except Exception:
                        pass

    def _call(self, ev: dict) -> None:
        try:
            self.callback(ev)
        except Exception:
            log.exception("event callback failed for %r", ev)


def subscribe_events(redis_url: str, callback: Callable[[dict], None], namespace: str = "loraserve") -> EventSubscriber:
    """Start a daemon thread delivering NS:events messages to callback; .stop() ends it."""
    sub = EventSubscriber(redis_url, callback, namespace)
    sub.start()
    return sub
