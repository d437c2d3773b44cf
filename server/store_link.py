"""The engine's link to the adapter store: fetch adapters through it, follow its events
(deleted/replaced adapters leave the pool and host cache), and heartbeat our resident set."""
from __future__ import annotations

import logging
import os
import socket
import threading
import uuid

from server.adapters import AdapterNotFound, SourceUnavailable

log = logging.getLogger("loraserve.store_link")

HEARTBEAT_S = 2.0       # how often an engine tells the store its load and resident adapters
HEARTBEAT_TTL_S = 15.0  # forgotten this long after its last beat


def advertised_address(host: str, port: int, advertise: str | None = None) -> str:
    """Where other processes dial this engine: --advertise-address, else host:port with a
    wildcard bind address replaced by this machine's name."""
    if advertise:
        return advertise
    if host in ("", "0.0.0.0", "::", "[::]"):
        host = socket.gethostname()
    if ":" in host and not host.startswith("["):     # an IPv6 address
        host = f"[{host}]"
    return f"{host}:{port}"


class StoreSource:
    """AdapterSource over the store's GetAdapter / FetchAdapter RPCs. Picklable (by address), so
    fetch worker processes open their own channel."""

    def __init__(self, client, target: str | None = None, token: str | None = None):
        self.client, self.target, self.token = client, target, token

    @classmethod
    def connect(cls, target: str, token: str | None = None) -> "StoreSource":
        from adapter_store.client import StoreClient
        return cls(StoreClient(target, token=token), target, token)

    def __reduce__(self):
        if self.target is None:
            raise TypeError("a StoreSource made from a channel cannot move to another process")
        return (StoreSource.connect, (self.target, self.token))

    def exists(self, adapter_id: str) -> bool:
        from adapter_store.client import AdapterNotFound as StoreNotFound, StoreUnavailable
        try:
            self.client.get(adapter_id)
            return True
        except StoreNotFound:
            return False
        except StoreUnavailable as e:
            raise SourceUnavailable(str(e)) from None

    def fetch(self, adapter_id: str, attempts: int = 4) -> tuple[int, bytes, bytes]:
        import grpc

        from adapter_store.client import AdapterNotFound as StoreNotFound, StoreClientError, StoreUnavailable
        for attempt in range(attempts):
            try:
                info, cfg, weights = self.client.fetch(adapter_id)
                return int(getattr(info, "version", 0)), cfg, weights
            except StoreNotFound:
                raise AdapterNotFound(adapter_id) from None
            except StoreUnavailable as e:
                raise SourceUnavailable(str(e)) from None
            except StoreClientError as e:
                # ABORTED: replaced or deleted while its bytes streamed; the next try gets the
                # new version, or NOT_FOUND
                if e.code != grpc.StatusCode.ABORTED or attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")


def attach_engine(engine, args, port: int, cleanup: list) -> None:
    """Called once the server listens: base model record, --adapter registration, events, and
    a heartbeat (address, model, load, resident adapters) that routers read through ListEngines."""
    if not args.redis_url:
        log.warning("no --redis-url: this engine will not see adapter delete/replace events")
        return
    from adapter_store.metadata import Metadata, subscribe_events

    meta = Metadata(args.redis_url)
    cfg = engine.cfg
    meta.register_base_model(cfg.name, cfg.dims_dict())

    local = {spec.partition("=")[0] for spec in (args.adapter or [])}   # --adapter folders: not the store's

    def recheck() -> None:
        """After the event stream was down: drop every adapter held whose store record is gone
        or newer (the deletes and replaces of that time were never heard)."""
        try:
            held = engine.call(engine.adapters.versions).result(timeout=60)
            for aid, version in held.items():
                if aid in local:
                    continue
                rec = meta.get(aid)
                if rec is None or rec["version"] != version:
                    log.info("adapter %s changed while events were down: dropping it from this engine", aid)
                    engine.call(lambda a=aid: engine.adapters.unload(a))
        except Exception as e:   # Redis down again: the next reconnect checks again
            log.warning("re-checking the adapters held failed: %s", e)

    def on_event(ev: dict) -> None:
        aid = ev.get("adapter_id")
        if ev.get("type") in ("deleted", "replaced") and aid:
            log.info("adapter %s %s: dropping it from this engine", aid, ev["type"])
            engine.call(lambda: engine.adapters.unload(aid))
        elif ev.get("type") == "reconnected":
            threading.Thread(target=recheck, name="adapter-recheck", daemon=True).start()

    sub = subscribe_events(args.redis_url, on_event)
    cleanup.append(sub.stop)

    engine_id = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"
    address = advertised_address(args.host, port, getattr(args, "advertise_address", None))
    stop = threading.Event()

    def beat() -> None:
        sched = engine.scheduler
        while not stop.is_set():
            try:   # (read from this thread: a len() and a dict copy, no engine state changed)
                resident = [a for a, r in list(engine.adapters.resident.items()) if not r.stale]
                meta.heartbeat(engine_id, address, resident, ttl_s=HEARTBEAT_TTL_S, base_model=cfg.name,
                               running=len(sched.running), waiting=len(sched.waiting))
            except Exception as e:     # Redis down: keep serving, try again later
                log.debug("heartbeat failed: %s", e)
            stop.wait(HEARTBEAT_S)

    threading.Thread(target=beat, name="heartbeat", daemon=True).start()
    cleanup.append(stop.set)


def register_local_adapters(target: str, token: str | None, base_model: str, adapters: dict[str, str]) -> None:
    """Register --adapter folders into the store (replacing older copies) so every engine sharing
    the store can serve them. Runs in the background: this engine already serves them locally."""
    from clients.client import Client

    with Client(target, token=token) as c:
        for name, path in adapters.items():
            try:
                c.register_adapter(path, adapter_id=name, base_model=base_model, replace=True, progress=False)
            except Exception as e:
                log.warning("registering --adapter %s in the store failed: %s", name, e)
