"""A blocking client of loraserve.v1.AdapterStore (the engine fetches adapters with it)."""
from __future__ import annotations

import pathlib
from typing import Iterator

import grpc

from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc

from .objstore import CHUNK
CONFIG_FILE = "adapter_config.json"          # the same names as server/lora.py, without importing torch
WEIGHTS_FILE = "adapter_model.safetensors"

__all__ = ["StoreClient", "StoreClientError", "AdapterNotFound", "StoreUnavailable", "CHANNEL_OPTIONS"]

CHANNEL_OPTIONS = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]


class StoreClientError(RuntimeError):
    """An AdapterStore RPC failed; .code is the grpc.StatusCode."""

    def __init__(self, code: grpc.StatusCode, message: str):
        super().__init__(f"{code.name}: {message}")
        self.code = code
        self.details = message


class AdapterNotFound(StoreClientError, KeyError):
    def __str__(self):  # KeyError would repr() the message
        return RuntimeError.__str__(self)


class StoreUnavailable(StoreClientError):
    pass


def _map(e: grpc.RpcError) -> StoreClientError:
    code, details = e.code(), e.details() or ""
    if code == grpc.StatusCode.NOT_FOUND:
        return AdapterNotFound(code, details)
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return StoreUnavailable(code, details)
    return StoreClientError(code, details)


class StoreClient:
    """StoreClient("127.0.0.1:50051"); fetch(id) -> (AdapterInfo, config bytes, weight bytes)."""

    def __init__(self, target: str | None = None, token: str | None = None, timeout: float = 300.0,
                 channel: grpc.Channel | None = None):
        if channel is None and not target:
            raise ValueError("StoreClient needs a target address or a channel")
        self._own = channel is None
        self.channel = channel or grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
        self.stub = pb_grpc.AdapterStoreStub(self.channel)
        self.token = token
        self.timeout = timeout

    def _md(self):
        return (("authorization", f"Bearer {self.token}"),) if self.token else None

    def close(self) -> None:
        if self._own:
            self.channel.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ------------------------------------------------------------------ reads
    def get(self, adapter_id: str, timeout: float | None = None) -> pb.AdapterInfo:
        try:
            return self.stub.GetAdapter(pb.GetAdapterRequest(adapter_id=adapter_id), timeout=timeout or 30.0)
        except grpc.RpcError as e:
            raise _map(e) from None

    def fetch(self, adapter_id: str, timeout: float | None = None) -> tuple[pb.AdapterInfo, bytes, bytes]:
        """The adapter's record, adapter_config.json and adapter_model.safetensors."""
        info = None
        files: dict[str, list[bytes]] = {CONFIG_FILE: [], WEIGHTS_FILE: []}
        try:
            for msg in self.stub.FetchAdapter(pb.FetchAdapterRequest(adapter_id=adapter_id),
                                              timeout=timeout or self.timeout):
                if msg.WhichOneof("kind") == "info":
                    info = msg.info
                else:
                    files.setdefault(msg.chunk.filename, []).append(msg.chunk.data)
        except grpc.RpcError as e:
            raise _map(e) from None
        if info is None:
            raise StoreClientError(grpc.StatusCode.INTERNAL, "FetchAdapter sent no AdapterInfo")
        return info, b"".join(files[CONFIG_FILE]), b"".join(files[WEIGHTS_FILE])

    def list(self, base_model: str = "", page_size: int = 0) -> Iterator[pb.AdapterInfo]:
        token = ""
        while True:
            try:
                resp = self.stub.ListAdapters(pb.ListAdaptersRequest(base_model=base_model, page_size=page_size,
                                                                     page_token=token), timeout=30.0)
            except grpc.RpcError as e:
                raise _map(e) from None
            yield from resp.adapters
            token = resp.next_page_token
            if not token:
                return

    # ------------------------------------------------------------------ writes
    def register(self, adapter_id: str, config: bytes, weights: bytes, base_model: str = "", sha256: str = "",
                 replace: bool = False, chunk_bytes: int = CHUNK, timeout: float | None = None) -> pb.AdapterInfo:
        header = pb.RegisterAdapterHeader(adapter_id=adapter_id, base_model=base_model, sha256=sha256,
                                          replace=replace)

        def gen():
            yield pb.RegisterAdapterRequest(header=header)
            for name, data in ((CONFIG_FILE, config), (WEIGHTS_FILE, weights)):
                mv = memoryview(data)
                for i in range(0, len(mv), chunk_bytes):
                    yield pb.RegisterAdapterRequest(chunk=pb.FileChunk(filename=name, data=bytes(mv[i:i + chunk_bytes])))
        return self._register(gen(), timeout)

    def register_dir(self, adapter_id: str, path: str | pathlib.Path, **kw) -> pb.AdapterInfo:
        """Register a local PEFT folder (adapter_config.json + adapter_model.safetensors)."""
        path = pathlib.Path(path)
        return self.register(adapter_id, (path / CONFIG_FILE).read_bytes(), (path / WEIGHTS_FILE).read_bytes(), **kw)

    def register_synthetic(self, adapter_id: str, rank: int, target_modules=(), seed: int = 0, alpha: float = 0.0,
                           base_model: str = "", replace: bool = False) -> pb.AdapterInfo:
        header = pb.RegisterAdapterHeader(adapter_id=adapter_id, base_model=base_model, replace=replace,
                                          synthetic=pb.SyntheticSpec(rank=rank, target_modules=list(target_modules),
                                                                     seed=seed, alpha=alpha))
        return self._register(iter([pb.RegisterAdapterRequest(header=header)]), None)

    def _register(self, requests, timeout) -> pb.AdapterInfo:
        try:
            return self.stub.RegisterAdapter(requests, timeout=timeout or self.timeout, metadata=self._md())
        except grpc.RpcError as e:
            raise _map(e) from None

    def delete(self, adapter_id: str) -> bool:
        try:
            return self.stub.DeleteAdapter(pb.DeleteAdapterRequest(adapter_id=adapter_id), timeout=30.0,
                                           metadata=self._md()).deleted
        except grpc.RpcError as e:
            raise _map(e) from None
