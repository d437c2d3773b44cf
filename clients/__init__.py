"""loraserve clients: the Python client library, the `loraserve` CLI, the S-LoRA workload
generator and benchmark, and the PEFT baseline.

    from clients import Client, AsyncClient
    with Client("localhost:50051") as c:
        print(c.complete("Hello", adapter_id="my-lora", max_new_tokens=16).text)

Names are imported lazily, so `import clients.pb` (used by the server) stays cheap.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "clients.client": ["Client", "AsyncClient", "GenerateChunk", "Completion", "Usage", "AdapterInfo", "PoolStats",
                       "EngineStats", "LoadResult", "FetchedAdapter", "RetryPolicy", "LoraServeError", "NotFound",
                       "InvalidArgument", "AlreadyExists", "ResourceExhausted", "Unavailable", "Unauthenticated",
                       "DeadlineExceeded", "PermissionDenied", "FailedPrecondition", "Cancelled", "Internal",
                       "Unimplemented", "error_from_rpc", "build_generate_request"],
    "clients.workload": ["WorkloadSpec", "Request", "adapter_probabilities", "generate_workload", "load_trace",
                         "save_trace", "synthetic_adapter_ids", "workload_summary"],
    "clients.bench": ["RequestResult", "compute_metrics", "run_requests", "run_workload",
                      "ensure_synthetic_adapters"],
}
_WHERE = {name: mod for mod, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    mod = _WHERE.get(name)
    if mod is None:
        raise AttributeError(f"module 'clients' has no attribute {name!r}")
    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + __all__)
