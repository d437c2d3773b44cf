"""gRPC servicers of the engine process: Inference (the data plane) and EngineAdmin.

The servicer validates and tokenizes, hands the request to the engine thread, and turns the
engine's outputs into stream messages (text deltas, stop strings, usage). It never blocks the
event loop: the engine talks back through loop.call_soon_threadsafe.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import math
import re
import uuid

import grpc

from clients.pb import loraserve_pb2 as pb
from clients.pb import loraserve_pb2_grpc as pb_grpc
from server.adapters import SourceUnavailable, fetch_failure
from server.engine import Engine
from server.request import Finish, Output, Request, StreamQueue
from server.sampler import SamplingParams
from server.tokenizer import TextStream, Tokenizer

ADAPTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
DEFAULT_MAX_NEW_TOKENS = 128
MAX_STOP_STRINGS, MAX_STOP_LEN = 16, 256
# Adapter lookups (GetAdapter on the store) block a thread each. They get threads of their own:
# on the loop's default executor they took every thread the embedded store's handlers, which
# they call, needed (six cold lookups at once deadlocked for the call's 30 s timeout).
_LOOKUPS = concurrent.futures.ThreadPoolExecutor(16, thread_name_prefix="adapter-lookup")


class BadRequest(Exception):
    def __init__(self, code: grpc.StatusCode, msg: str):
        super().__init__(msg)
        self.code, self.msg = code, msg


def _invalid(msg: str) -> BadRequest:
    return BadRequest(grpc.StatusCode.INVALID_ARGUMENT, msg)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, engine: Engine, tokenizer: Tokenizer | None):
        self.engine, self.tok = engine, tokenizer
        self.vocab = engine.cfg.vocab_size

    def _params(self, p: pb.SamplingParams, prompt_len: int) -> SamplingParams:
        limit = self.engine.max_model_len
        if prompt_len >= limit:
            raise _invalid(f"the prompt is {prompt_len} tokens; this server's limit is {limit} tokens "
                           f"for prompt plus output: shorten the prompt")
        max_new = p.max_new_tokens or min(DEFAULT_MAX_NEW_TOKENS, limit - prompt_len)
        if prompt_len + max_new > limit:
            raise _invalid(f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new}) exceeds the "
                           f"model's limit of {limit} tokens; shorten the prompt or lower max_new_tokens")
        if not math.isfinite(p.temperature) or not 0 <= p.temperature <= 100:
            raise _invalid(f"temperature must be in [0, 100] (0, or below 1e-5: greedy), got {p.temperature}")
        if not math.isfinite(p.top_p) or not 0 <= p.top_p <= 1:
            raise _invalid(f"top_p must be in [0, 1], got {p.top_p}")
        if not 0 <= p.top_k <= self.vocab:
            raise _invalid(f"top_k must be in [0, {self.vocab}] (0: off), got {p.top_k}")
        if len(p.stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LEN or not s for s in p.stop):
            raise _invalid(f"stop takes at most {MAX_STOP_STRINGS} non-empty strings of up to {MAX_STOP_LEN} characters")
        if p.stop and self.tok is None:
            raise _invalid("stop strings need a tokenizer, and this model has no tokenizer.json")
        return SamplingParams(
            max_new_tokens=max_new, temperature=p.temperature, top_p=p.top_p or 1.0, top_k=p.top_k,
            seed=p.seed if p.HasField("seed") else None, stop=tuple(p.stop),
            ignore_eos=p.ignore_eos, logprobs=p.logprobs)

    def _prompt(self, r: pb.GenerateRequest) -> list[int]:
        which = r.WhichOneof("input")
        if which == "prompt_token_ids":
            ids = list(r.prompt_token_ids.ids)
            bad = next((t for t in ids if not 0 <= t < self.vocab), None)
            if bad is not None:
                raise _invalid(f"prompt_token_ids holds {bad}, outside the vocabulary [0, {self.vocab})")
        elif which == "prompt":
            if self.tok is None:
                raise _invalid("this model has no tokenizer.json: send prompt_token_ids instead of prompt")
            ids = self.tok.encode(r.prompt)
        else:
            ids = []
        if not ids:
            raise _invalid("the prompt is empty: set prompt or prompt_token_ids")
        return ids

    async def _check_adapter(self, adapter_id: str) -> None:
        if not adapter_id:
            return
        if not ADAPTER_ID.match(adapter_id):
            raise _invalid(f"adapter_id {adapter_id!r} is not valid: use 1-128 of [A-Za-z0-9._-], "
                           f"starting with a letter or digit")
        mgr = self.engine.adapters
        if mgr.is_known_locally(adapter_id):
            return
        try:   # (its own threads: the embedded store's handlers, which this call reaches, need the loop's)
            exists = await asyncio.get_running_loop().run_in_executor(_LOOKUPS, mgr.source.exists, adapter_id)
        except SourceUnavailable as e:
            raise BadRequest(grpc.StatusCode.UNAVAILABLE,
                             f"adapter {adapter_id!r} is not loaded and the adapter store is unreachable: {e}")
        if not exists:
            raise BadRequest(grpc.StatusCode.NOT_FOUND, f"adapter {adapter_id!r} is not registered")

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        try:
            if len(request.request_id) > 128:
                raise _invalid("request_id is longer than 128 characters")
            prompt = self._prompt(request)
            params = self._params(request.params, len(prompt))
            await self._check_adapter(request.adapter_id)
        except BadRequest as e:
            await context.abort(e.code, e.msg)
        rid = request.request_id or uuid.uuid4().hex
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Output] = asyncio.Queue()
        req = Request(rid, prompt, params, request.adapter_id, stream=StreamQueue(loop, queue))
        text = TextStream(self.tok, list(params.stop)) if self.tok else None
        sent = 0
        done = False
        self.engine.submit(req)
        try:
            while not done:
                outs = [await queue.get()]
                while not queue.empty():          # coalesce what piled up while we were away
                    outs.append(queue.get_nowait())
                ids, lps, finish = [], [], None
                for o in outs:
                    if o.error is not None:
                        done = True
                        await context.abort(getattr(grpc.StatusCode, o.error[0]), o.error[1])
                    ids += o.token_ids
                    lps += o.logprobs
                    finish = o.finish or finish
                msg = pb.GenerateResponse(request_id=rid)
                if text is not None:
                    delta, counted = text.push(ids, final=finish is not None)
                    msg.text = delta
                    if text.stopped:
                        # the tokens after the one that completed the stop string are not output
                        keep = max(counted - (len(text.ids) - len(ids)), 0)
                        ids, lps = ids[:keep], lps[:keep]
                        if finish is None:
                            self.engine.abort(rid, req)
                        finish = Finish.STOP
                msg.token_ids.extend(ids)
                msg.logprobs.extend(lps)
                sent += len(ids)
                if finish is not None:
                    done = True
                    msg.finished = True
                    msg.finish_reason = int(finish)
                    msg.usage.prompt_tokens = len(prompt)
                    msg.usage.completion_tokens = sent
                yield msg
        finally:
            if not done:       # client cancelled or the deadline passed: free pages now
                self.engine.abort(rid, req)


class EngineAdminServicer(pb_grpc.EngineAdminServicer):
    def __init__(self, engine: Engine, inference: InferenceServicer, model_name: str):
        self.engine, self.inference, self.model_name = engine, inference, model_name

    async def _run(self, fn):
        return await asyncio.wrap_future(self.engine.call(fn))

    async def LoadAdapter(self, request, context):
        aid = request.adapter_id
        try:
            await self.inference._check_adapter(aid)
            if not aid:
                raise _invalid("adapter_id is required")
        except BadRequest as e:
            await context.abort(e.code, e.msg)
        mgr = self.engine.adapters
        mgr.prefetch(aid)

        def load() -> int | None:
            try:
                slot = mgr.acquire(aid)
            except KeyError:          # the host cache dropped it since it was ready: wait again
                return None
            mgr.release(aid, slot)
            return mgr.resident[aid].pages

        while True:
            while (code := mgr.readiness(aid)) != 1:     # (fetches again what an unload dropped)
                err = mgr.fetch_error(aid) if code < 0 else None
                if err is not None:
                    status, msg = fetch_failure(aid, err)
                    await context.abort(getattr(grpc.StatusCode, status), msg)
                await asyncio.sleep(0.01)
            if request.host_only:
                return pb.LoadAdapterResponse(loaded=True, pages=0)
            try:
                pages = await self._run(load)
            except Exception as e:        # no room: running requests hold the pool
                await context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, self._no_room(aid, e))
            if pages is not None:
                return pb.LoadAdapterResponse(loaded=True, pages=pages)

    def _no_room(self, aid: str, e: Exception) -> str:
        need, total = self.engine.adapters.pages_to_load_or_zero(aid), self.engine.pool.num_pages
        if need > total:
            return (f"adapter {aid!r} takes {need} pages and this server's whole pool is {total}: it can never be "
                    f"loaded here (a larger pool: --pool-mb or --gpu-memory-utilization; or a smaller rank or fewer "
                    f"target modules)")
        return f"adapter {aid!r} does not fit the pool now: {e}"

    async def UnloadAdapter(self, request, context):
        if not request.adapter_id:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, "adapter_id is required")
        ok = await self._run(lambda: self.engine.adapters.unload(request.adapter_id, drop_host=not request.keep_host))
        return pb.UnloadAdapterResponse(unloaded=bool(ok))

    async def GetStats(self, request, context):
        e = self.engine

        def snap():
            s = e.pool.stats()
            return pb.EngineStats(
                pool=pb.PoolStats(total_pages=s.total_pages, kv_pages=s.kv_pages, adapter_pages=s.adapter_pages,
                                  free_pages=s.free_pages, page_bytes=s.page_bytes, block_tokens=s.block_tokens,
                                  adapter_dtype=s.adapter_dtype),
                running=len(e.scheduler.running), waiting=len(e.scheduler.waiting),
                resident_adapters=[a for a, r in e.adapters.resident.items() if not r.stale],
                cached_adapters=e.adapters.cached_ids(), steps=e.stats.steps,
                generated_tokens=e.stats.generated_tokens, preemptions=e.scheduler.preemptions,
                model=self.model_name, device=str(e.model.device),
                dtype=str(e.model.dtype).removeprefix("torch."), vocab_size=e.cfg.vocab_size,
                max_model_len=e.max_model_len, decode_steps=e.stats.decode_steps,
                decode_tokens=e.stats.decode_tokens, decode_adapters=e.stats.decode_adapters,
                decode_adapter_bytes=e.stats.decode_adapter_bytes, weight_bytes=e.model.weight_bytes,
                adapter_loads=e.adapters.loads, adapter_preloads=e.adapters.preloads,
                busy_seconds=e.stats.busy_s, host_seconds=e.stats.host_s, device_seconds=e.stats.device_s,
                prefill_steps=e.stats.prefill_steps, prefill_tokens=e.stats.prefill_tokens,
                graph_steps=e.stats.graph_steps, gpu_seconds=e.stats.gpu_s)

        return await self._run(snap)
