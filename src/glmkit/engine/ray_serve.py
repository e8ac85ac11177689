"""glmkit's engine as a Ray Serve deployment: N replicas, each with its own continuous batching.

`glmkit serve --ray --replicas N --model DIR` deploys EngineReplica N times on a Ray cluster (a
local one it starts, or the one at --ray-address) and serves the API itself, over RayBackend:
the chat layer's Backend whose tokens come from the replicas through a Serve DeploymentHandle.
Ray's router in the gateway process picks a replica per request (the less loaded of two, by
their ongoing requests); the chat protocol, tools, console and store stay in the gateway, which
renders prompts to token ids as it does for any remote engine (engine/remote.py).

Why a handle and not Ray's HTTP proxy in front of each replica's own server: the proxy would add
a process and two HTTP hops per token chunk (client -> proxy -> replica ASGI app), and per token
costs are what a small model's throughput is made of.  A handle call is one Ray streaming
generator: the replica yields every event it has at that moment in one item, so under load one
item carries several tokens.

A replica names itself (Serve's replica id and its pid) in the first item of every stream: the
gateway counts requests and tokens per replica (its /metrics, glmkit_replica_*).  A request that
fails before its first item because its replica died or was unreachable is sent again (Ray
replaces the dead replica; the router sends it elsewhere meanwhile): no token of it was shown to
anyone.  One that was streaming fails with EngineUnavailable, as with any engine that goes away.
Leaving a stream early cancels the handle call, which cancels the replica's generator and frees
its sequence.

Ray is imported only here, and only when this module's functions run: `pip install
'glmkit[cluster]'` brings it; without it, one GlmkitError says so."""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
from collections.abc import Sequence

from ..errors import GlmkitError
from .queued_stream import QueuedStream
from .remote import EngineUnavailable, RemoteLoad, exception_text
from .requests import GenerationRequest, QueueFull, SamplingParams, TokenEvent

MISSING = "--ray needs Ray Serve, which is not installed: pip install 'glmkit[cluster]'"
DEPLOYMENT = "glmkit-engine"
RETRIES = 3                 # a request whose replica died before it streamed: sent again, this often
RETRY_PAUSE_S = 0.5
# a stream's items are at least this far apart by default (its first token and its last go at
# once): an item costs the replica and the gateway 1-2 ms of CPU whatever it carries, several
# decode steps of a small model; a model slower than 20 tokens/s per stream is never held back
STREAM_INTERVAL_S = 0.05


def import_ray():
    """(ray, ray.serve), or one GlmkitError naming the extra to install."""
    try:
        import ray
        from ray import serve
    except ImportError:
        raise GlmkitError(MISSING) from None
    return ray, serve


# -- the replica ---------------------------------------------------------------------------------
class EngineReplica:
    """One replica: the model's weights and a Scheduler of its own, running its steps in a thread;
    `generate` streams a sequence's events to the handle's caller."""

    def __init__(self, model: str, load: dict, max_batch: int, kv_cache_mb: int, max_queue: int, threads: int,
                 interval: float = STREAM_INTERVAL_S):
        import torch

        from ..models import load_checkpoint
        from ..models.quantize import QuantConfig
        from .scheduler import Scheduler
        torch.set_num_threads(threads)
        quant = QuantConfig.parse(load["quantize"], load["group_size"], False)
        checkpoint = load_checkpoint(model, device=load["device"], dtype=load["dtype"], quant=quant,
                                     adapter=load.get("adapter"))
        self.model_id = checkpoint.config.name
        self.scheduler = Scheduler.from_memory(checkpoint.model, kv_cache_mb, max_batch, max_queue=max_queue,
                                               compile=load["compile"])
        self.scheduler.start()
        try:
            from ray import serve
            rid = serve.get_replica_context().replica_id.unique_id
        except Exception:        # outside Serve (a test constructing it directly)
            rid = "local"
        self.replica = f"{rid} pid {os.getpid()}"
        self.interval = interval
        self._loop = None
        self._ready: list[asyncio.Event] = []
        self._lock = threading.Lock()

    def info(self) -> dict:
        return {"replica": self.replica, "pid": os.getpid(), "model": self.model_id,
                "max_seq_len": self.scheduler.max_seq_len, "max_batch": self.scheduler.max_batch}

    def stats(self) -> dict:
        s = self.scheduler.stats
        return {"replica": self.replica, "requests": s.requests, "generated_tokens": s.generated_tokens,
                "cancelled": s.cancelled, "running": self.scheduler.running, "waiting": self.scheduler.queue_length}

    async def generate(self, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int], max_new: int,
                       logprobs: int | None, forced: tuple[int, ...]):
        """Items of (this replica's name in the first item, else None; [(token, finish, logprob,
        top_logprobs), ...]): every event ready when the item is made."""
        self._loop = asyncio.get_running_loop()
        handle = self.scheduler.submit(GenerationRequest(list(prompt), params, max_new, frozenset(stop_ids),
                                                         logprobs, tuple(forced)))
        ready = asyncio.Event()
        handle.on_event(lambda: self._wake(ready))
        name, events, last = self.replica, [], 0.0
        try:
            while True:
                try:
                    while True:
                        ev = handle.get_nowait()
                        events.append((ev.token, ev.finish, ev.logprob, ev.top_logprobs))
                        if ev.finish:
                            break
                except queue.Empty:
                    pass
                finished = bool(events) and events[-1][1] is not None
                wait = last + self.interval - time.monotonic()
                if events and (finished or wait <= 0):
                    yield name, events
                    if finished:
                        return
                    name, events, last = None, [], time.monotonic()
                elif events:
                    await asyncio.sleep(wait)       # more of this stream's tokens join the item
                else:
                    await ready.wait()
                    ready.clear()
        finally:
            handle.cancel()         # a no-op once finished; frees the slot when the caller left

    def _wake(self, ready: asyncio.Event):
        """From the scheduler's thread: one call_soon_threadsafe for all the streams a step gave
        events to (as server/completions.py's _Waker)."""
        with self._lock:
            first = not self._ready
            self._ready.append(ready)
        if first:
            self._loop.call_soon_threadsafe(self._wake_all)

    def _wake_all(self):
        with self._lock:
            ready, self._ready = self._ready, []
        for r in ready:
            r.set()

    def __del__(self):
        scheduler = getattr(self, "scheduler", None)
        if scheduler is not None:
            scheduler.stop()


# -- deploying -----------------------------------------------------------------------------------
def deploy(model: str, load: dict, replicas: int, threads: int | None, max_batch: int, kv_cache_mb: int,
           max_queue: int, address: str | None = None, app: str = DEPLOYMENT, log=None,
           interval: float = STREAM_INTERVAL_S):
    """Connect to Ray (start a local cluster when `address` is None), deploy `replicas` copies of
    EngineReplica as the Serve application `app`, and wait until every replica has loaded.
    `threads`: PyTorch threads of each replica (None: the cluster's CPUs shared out), also the
    CPUs Ray reserves for it.  Returns (the application's DeploymentHandle, what its replicas
    run with).  `interval`: seconds between two items of a stream, at least (0: every event at once)."""
    ray, serve = import_ray()
    from ray.serve.config import ProxyLocation
    from ray.serve.schema import LoggingConfig
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, logging_level="WARNING", log_to_driver=True)
        except ConnectionError as e:
            raise GlmkitError(f"cannot join the Ray cluster at {address}: {str(e).splitlines()[0]}") from None
    cpus = float(ray.cluster_resources().get("CPU", 1))
    threads = threads or max(1, int(cpus // replicas))
    # Ray's reservation: the replica's threads, shared out when more replicas are asked for than
    # the cluster has CPUs (they still all start; each runs its `threads` as the OS schedules them)
    num_cpus = min(float(threads), cpus / replicas)
    serve.start(proxy_location=ProxyLocation.Disabled)
    deployment = serve.deployment(
        EngineReplica, name=DEPLOYMENT, num_replicas=replicas,
        ray_actor_options={"num_cpus": num_cpus},
        # a replica takes what its batch and queue hold; beyond that the router waits for room
        max_ongoing_requests=max_batch + max_queue,
        logging_config=LoggingConfig(log_level="WARNING", enable_access_log=False),
        health_check_period_s=2, health_check_timeout_s=30, graceful_shutdown_timeout_s=5)
    if log is not None:
        log(f"deploying {replicas} replica{'s' if replicas > 1 else ''} of {model} on Ray "
            f"({threads} thread{'s' if threads > 1 else ''} and {num_cpus:g} CPU each, {cpus:g} CPUs in the cluster)")
    handle = serve.run(deployment.bind(model, load, max_batch, kv_cache_mb, max_queue, threads, interval),
                       name=app, route_prefix=None)
    return handle, {"threads": threads, "num_cpus": num_cpus, "cluster_cpus": cpus}


def undeploy(app: str = DEPLOYMENT, shutdown: bool = True):
    """Delete the application (its replicas end), then leave Ray (a local cluster this process
    started ends with it)."""
    ray, serve = import_ray()
    try:
        serve.delete(app)
    except Exception:
        pass
    if shutdown and ray.is_initialized():
        ray.shutdown()


# -- the gateway's side --------------------------------------------------------------------------
class RayBackend:
    """A Backend whose tokens come from the replicas behind a Serve DeploymentHandle."""

    def __init__(self, handle, tokenizer, chat_format, model_id: str, context_length: int,
                 name: str = DEPLOYMENT, timeout: float = 60.0):
        self.handle = handle
        self.url = f"ray:{name}"            # how errors name the engine
        self.tokenizer = tokenizer
        self.chat_format = chat_format
        self.model_id = model_id
        self.context_length = context_length
        self.timeout = timeout
        self.streams: set[RayStream] = set()
        self.replicas: dict[str, dict[str, int]] = {}      # name -> {"requests": n, "tokens": n}
        self._lock = threading.Lock()
        self.scheduler = RayLoad(self)

    def check(self) -> dict:
        """Ask a replica what it serves; lowers context_length to the replicas' sequence length."""
        try:
            info = self.handle.info.remote().result(timeout_s=self.timeout)
        except Exception as e:
            raise EngineUnavailable(f"the engine at {self.url} did not answer ({exception_text(e)})") from None
        self.context_length = min(self.context_length, info["max_seq_len"])
        return info

    def submit(self, prompt: Sequence[int], params: SamplingParams, stop_ids: frozenset[int],
               max_new_tokens: int | None = None, logprobs: int | None = None,
               forced_prefix: Sequence[int] = ()) -> RayStream:
        n = self.scheduler.admit(prompt, params, max_new_tokens)
        return RayStream(self, (list(prompt), params, frozenset(stop_ids), n, logprobs, tuple(forced_prefix)))

    def count(self, replica: str, requests: int = 0, tokens: int = 0):
        with self._lock:
            c = self.replicas.setdefault(replica, {"requests": 0, "tokens": 0})
            c["requests"] += requests
            c["tokens"] += tokens

    def close(self):
        for s in list(self.streams):
            s.abort(GlmkitError("the server stopped before this generation finished"))


class RayLoad(RemoteLoad):
    """RemoteLoad (the gateway's /health and /metrics) with each replica's share."""

    def metric_lines(self) -> list[str]:
        with self.backend._lock:
            counts = {k: dict(v) for k, v in self.backend.replicas.items()}
        lines = []
        for key, help_ in (("requests", "Requests a replica streamed, by replica (Serve id and pid)."),
                           ("tokens", "Tokens a replica generated, by replica.")):
            name = f"glmkit_replica_{key}_total"
            lines += [f"# HELP {name} {help_}", f"# TYPE {name} counter"]
            lines += [f'{name}{{replica="{r}"}} {c[key]}' for r, c in sorted(counts.items())]
        return lines


class RayStream(QueuedStream):
    """One sequence generated by a replica: the TokenStream of chat/backend.py."""

    def __init__(self, backend: RayBackend, call: tuple):
        super().__init__()
        self.backend = backend
        backend.streams.add(self)
        threading.Thread(target=self._read, args=(call,), name="glmkit-ray", daemon=True).start()

    def _close(self, response) -> None:
        response.cancel()         # the replica's generator is cancelled and frees the sequence

    def _read(self, call: tuple):
        from ray import exceptions as rex
        url = self.backend.url
        try:
            for attempt in range(RETRIES + 1):
                started = False
                try:
                    self._response = self.backend.handle.options(stream=True).generate.remote(*call)
                    if self._cancelled.is_set():
                        self._response.cancel()
                        return
                    for replica, events in self._response:
                        if replica is not None:
                            started = True
                            self.backend.count(replica, requests=1)
                            name = replica
                        self._events(events, name)
                        if self._done or self._cancelled.is_set():
                            return
                    if not self._cancelled.is_set():
                        raise EngineUnavailable(f"the engine at {url} ended the stream before the sequence finished")
                    return
                except (rex.RayActorError, rex.ActorUnavailableError) as e:
                    # the replica died (or could not be reached): before its first item nothing was
                    # shown, so the request goes again (to a live replica, or the dead one's successor)
                    if started or attempt == RETRIES or self._cancelled.is_set():
                        raise EngineUnavailable(f"the engine at {url} failed during generation "
                                                f"(a replica went away: {type(e).__name__})") from None
                    time.sleep(RETRY_PAUSE_S * (attempt + 1))
        except rex.RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, QueueFull):
                self._fail(QueueFull(f"the engine at {url} is busy: {cause}"))
            elif isinstance(cause, GlmkitError):
                self._fail(EngineUnavailable(f"the engine at {url} failed: {cause}"))
            else:
                self._fail(EngineUnavailable(f"the engine at {url} failed during generation ({exception_text(cause or e)})"))
        except EngineUnavailable as e:
            self._fail(e)
        except Exception as e:
            if not self._cancelled.is_set():      # a cancelled call ends with Ray's cancellation error
                self._fail(EngineUnavailable(f"the engine at {url} failed during generation ({exception_text(e)})"))
        finally:
            self.backend.streams.discard(self)

    def _events(self, events: list, replica: str):
        stats = self.backend.scheduler.stats
        for token, finish, logprob, top in events:
            ev = TokenEvent(token, finish, logprob, top)
            stats.generated_tokens += 1
            if finish:
                self._done = True
            self._put(ev)
        self.backend.count(replica, tokens=len(events))

