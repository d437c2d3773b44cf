"""The PEFT baseline of S-LoRA's evaluation: Hugging Face transformers + PEFT in this process,
serving the same workload on S-LoRA's schedule (its benchmarks/run_exp_peft.py):

- take every request that has arrived; group them by adapter, in order of first arrival;
- for each group, make its adapter the active one and serve it in batches of up to
  ``max_batch_size`` (S-LoRA: 6 in its main runs, 50 for Llama-7B in its Table 3): prompts padded
  to the batch's longest (without a mask, as S-LoRA's identical dummy prompts need none: the
  baseline measures time, not text), greedy decoding with the KV cache to the batch's longest
  output, each request leaving the batch (and the cache) when its own output is complete;
- then take the requests that arrived meanwhile, and so on.

Each request is "sent" at its trace timestamp, so its latency and first-token latency include
the time it queued (the definitions of ``loraserve bench``). EOS is ignored: every request
produces exactly ``output_len`` tokens. Unlike S-LoRA's script, requests still unserved
``drain_timeout`` seconds after the last arrival are cancelled, as ``loraserve bench`` does.

Adapters are PEFT folders: local ones, ones fetched from the adapter store (FetchAdapter), or
synthetic ones materialized from their spec with ``adapter_store.synthetic`` (the same bytes the
store generates); when that module is not importable a local deterministic generator is used.
"""
from __future__ import annotations

import atexit
import json
import pathlib
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Sequence

from clients.bench import ProgressLine, RequestResult
from clients.workload import Request

__all__ = ["AdapterSource", "materialize_synthetic", "adapter_sources_for", "run_peft_baseline"]


@dataclass
class AdapterSource:
    adapter_id: str
    path: str


_TMP: list[str] = []


def _tmpdir() -> pathlib.Path:
    d = tempfile.mkdtemp(prefix="loraserve-peft-")
    _TMP.append(d)
    return pathlib.Path(d)


@atexit.register
def _cleanup() -> None:
    for d in _TMP:
        shutil.rmtree(d, ignore_errors=True)


def _model_dims(model_dir: str | pathlib.Path) -> tuple[dict, str]:
    from server.config import ModelConfig  # noqa: PLC0415
    cfg = ModelConfig.from_dir(model_dir)
    return cfg.dims_dict(), cfg.name


def materialize_synthetic(dest: str | pathlib.Path, model_dir: str | pathlib.Path, rank: int,
                          target_modules: Sequence[str], seed: int, alpha: float = 0.0) -> pathlib.Path:
    """Write the PEFT folder of a synthetic adapter (``alpha`` 0: 2 * rank) for the model in
    ``model_dir`` and return it."""
    dims, name = _model_dims(model_dir)
    alpha = float(alpha or 2 * rank)
    targets = tuple(target_modules)
    try:
        from adapter_store.synthetic import synthetic_adapter  # noqa: PLC0415
        from adapter_store.validate import BaseDims, SyntheticParams  # noqa: PLC0415
        cfg_bytes, weights = synthetic_adapter(SyntheticParams(int(rank), targets, int(seed), alpha),
                                               BaseDims.from_dict(dims, name), name)
    except ImportError:
        cfg_bytes, weights = _local_synthetic(dims, int(rank), targets, int(seed), alpha)
    d = pathlib.Path(dest)
    d.mkdir(parents=True, exist_ok=True)
    (d / "adapter_config.json").write_bytes(cfg_bytes)
    (d / "adapter_model.safetensors").write_bytes(weights)
    return d


def _local_synthetic(dims: dict, rank: int, targets: tuple, seed: int, alpha: float) -> tuple[bytes, bytes]:
    """Fallback generator (same distribution as the store's: A ~ N(0, 1/in), B ~ N(0, 0.02^2/r),
    float16), used only when adapter_store.synthetic is unavailable."""
    import torch  # noqa: PLC0415
    from safetensors.torch import save  # noqa: PLC0415

    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(dims["num_layers"]):
        for m in targets:
            d_in, d_out = dims["modules"][m]
            block = "mlp" if m in ("gate_proj", "up_proj", "down_proj") else "self_attn"
            pre = f"base_model.model.model.layers.{layer}.{block}.{m}"
            tensors[f"{pre}.lora_A.weight"] = (torch.randn(rank, d_in, generator=g) * d_in ** -0.5).half()
            tensors[f"{pre}.lora_B.weight"] = (torch.randn(d_out, rank, generator=g) * 0.02 / rank ** 0.5).half()
    cfg = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": list(targets),
           "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "task_type": "CAUSAL_LM",
           "inference_mode": True}
    return json.dumps(cfg).encode(), save(tensors)


async def adapter_sources_for(client, requests: Sequence[Request], args) -> dict[str, AdapterSource]:
    """PEFT folders for the adapters ``requests`` use: synthetic bench adapters are materialized
    from their spec (``--ranks``/``--targets``, seed = index); others are fetched from the store."""
    ids = sorted({r.adapter_id for r in requests if r.adapter_id})
    root = _tmpdir()
    out = {}
    for aid in ids:
        dest = root / re.sub(r"[^A-Za-z0-9._-]", "_", aid)
        m = re.fullmatch(r"bench-(\d{5})", aid)
        if getattr(args, "synthetic", False) and m:
            i = int(m.group(1))
            materialize_synthetic(dest, args.model, args.ranks[i % len(args.ranks)], args.targets, seed=i)
        else:
            fetched = await client.fetch_adapter(aid)
            if fetched.files.get("adapter_model.safetensors"):
                fetched.save(dest)
            else:  # a synthetic record sent without weights: regenerate from its spec
                info = fetched.info
                materialize_synthetic(dest, args.model, info.rank, info.target_modules, seed=0, alpha=info.alpha)
        out[aid] = AdapterSource(aid, str(dest))
    return out


def _peft_name(adapter_id: str) -> str:
    # PEFT keys adapters in nn.ModuleDicts: no dots allowed
    return "a_" + re.sub(r"[^A-Za-z0-9_]", "_", adapter_id)


def load_model(model_dir: str, sources: dict[str, AdapterSource], device: str | None = None,
               dtype: str = "float16"):
    """The transformers model with every adapter loaded into one PeftModel (or the bare model)."""
    import torch  # noqa: PLC0415
    from transformers import AutoModelForCausalLM  # noqa: PLC0415

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cpu") and dtype != "float32":
        dtype = "float32"      # half-precision matmuls on CPU are slow or missing
    tdtype = getattr(torch, dtype)
    try:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=tdtype)
    except TypeError:          # transformers < 4.56 names it torch_dtype
        model = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=tdtype)
    model.to(device).eval()
    if sources:
        from peft import PeftModel  # noqa: PLC0415
        items = list(sources.values())
        model = PeftModel.from_pretrained(model, items[0].path, adapter_name=_peft_name(items[0].adapter_id))
        for s in items[1:]:
            model.load_adapter(s.path, adapter_name=_peft_name(s.adapter_id))
        model.to(device).eval()
    return model, device


def run_peft_baseline(requests: Sequence[Request], model_dir: str, sources: dict[str, AdapterSource], *,
                      device: str | None = None, dtype: str = "float16", duration: float | None = None,
                      drain_timeout: float = 600.0, quiet: bool = True, label: str = "peft",
                      model=None, max_batch_size: int = 6) -> tuple[list[RequestResult], float]:
    """Serve ``requests`` on S-LoRA's PEFT schedule (module docstring); returns (results,
    total_time) with the meaning of ``clients.bench.run_requests``. ``max_batch_size`` 1 serves
    one request at a time. ``model`` (from ``load_model``) may be reused across runs."""
    import collections  # noqa: PLC0415
    import contextlib  # noqa: PLC0415
    import inspect  # noqa: PLC0415

    import torch  # noqa: PLC0415

    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be 1 or more, got {max_batch_size}")
    missing = sorted({r.adapter_id for r in requests if r.adapter_id} - set(sources))
    if missing:
        raise ValueError(f"no PEFT folder for adapters {missing[:5]}")
    if model is None:
        model, device = load_model(model_dir, sources, device, dtype)
    else:
        device = str(next(model.parameters()).device)
    if duration is not None:
        requests = [r for r in requests if r.timestamp <= duration]
    reqs = sorted(requests, key=lambda r: r.timestamp)
    results = {r.index: RequestResult(r.index, r.adapter_id, r.input_len, r.output_len, r.timestamp) for r in reqs}
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers >= 5.x names the KV cache argument/output `cache`; older ones `past_key_values`
    cache_kw = "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"
    cuda = device.startswith("cuda")
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    bar = ProgressLine(label, len(reqs), quiet)
    stop_at = (reqs[-1].timestamp if reqs else 0.0) + drain_timeout
    t0 = time.perf_counter()
    last = [t0]

    def finish(r: Request, error: str | None = None) -> None:
        res = results[r.index]
        if error:
            res.error = error
            bar.failed += 1
        else:
            res.completion_tokens = r.output_len
            res.latency = time.perf_counter() - (t0 + r.timestamp)
            bar.done += 1
        last[0] = time.perf_counter()
        bar.tick()

    def run_batch(batch: list[Request]) -> None:
        """One padded batch, greedy, to its longest output; finished rows leave the KV cache."""
        longest = max(r.input_len for r in batch)
        ids = torch.tensor([[r.prompt_token_ids[0]] * (longest - r.input_len) + list(r.prompt_token_ids)
                            for r in batch], device=device)
        out = model(input_ids=ids, use_cache=True)
        tok = out.logits[:, -1].argmax(-1, keepdim=True)
        past = out.get(cache_kw)
        sync()
        for r in batch:
            results[r.index].first_token_latency = time.perf_counter() - (t0 + r.timestamp)
        active, made = list(batch), 1
        while True:
            keep = [j for j, r in enumerate(active) if r.output_len > made]
            if len(keep) < len(active):
                sync()
                for j, r in enumerate(active):
                    if r.output_len <= made:
                        finish(r)
                if not keep:
                    return
                active, tok, past = [active[j] for j in keep], tok[keep], _keep_rows(past, keep, device)
            out = model(input_ids=tok, use_cache=True, **{cache_kw: past})
            past = out.get(cache_kw)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
            made += 1

    pending = collections.deque(reqs)
    with torch.inference_mode():
        while pending:
            now = time.perf_counter() - t0
            if pending[0].timestamp > now:
                time.sleep(pending[0].timestamp - now)
                continue
            queue = []
            while pending and pending[0].timestamp <= now:
                r = pending.popleft()
                results[r.index].sent = r.timestamp
                bar.sent += 1
                queue.append(r)
            groups: dict[str, list[Request]] = {}
            for r in queue:
                groups.setdefault(r.adapter_id, []).append(r)
            for aid, group in groups.items():
                if aid:
                    model.set_adapter(_peft_name(aid))
                    ctx = contextlib.nullcontext()
                else:
                    ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
                with ctx:
                    for k in range(0, len(group), max_batch_size):
                        batch = group[k:k + max_batch_size]
                        if time.perf_counter() - t0 > stop_at:      # past the drain: cancel, as bench does
                            for r in batch:
                                finish(r, "CANCELLED")
                            continue
                        try:
                            run_batch(batch)
                        except (RuntimeError, torch.cuda.OutOfMemoryError) as e:  # OOM or a bad request
                            for r in batch:
                                if results[r.index].latency is None and not results[r.index].error:
                                    finish(r, "RESOURCE_EXHAUSTED" if "out of memory" in str(e).lower() else "INTERNAL")
                            if cuda:
                                torch.cuda.empty_cache()
    bar.close()
    return [results[r.index] for r in reqs], max(last[0] - t0, 1e-9)


def _keep_rows(cache, keep: list[int], device):
    """The KV cache of the batch rows in ``keep`` (a DynamicCache, or the legacy tuples)."""
    import torch  # noqa: PLC0415

    idx = torch.tensor(keep, device=device)
    if hasattr(cache, "batch_select_indices"):
        cache.batch_select_indices(idx)
        return cache
    return tuple(tuple(t.index_select(0, idx) for t in layer) for layer in cache)
