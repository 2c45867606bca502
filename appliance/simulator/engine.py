"""The simulated engine core: queueing, time to first token, token pacing, metrics, sleep, death.

`Engine.run()` is an async generator yielding how many new tokens each engine step produced.
Pacing is time-based (tokens due since the first token), so a busy event loop batches several
tokens into one step instead of slowing down, as vLLM's stream coalesces deltas under load. With
speculative decoding a step yields 1..k+1 tokens, as MTP does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass

from appliance.simulator.args import ServeArgs
from appliance.simulator.errors import EngineDeadError
from appliance.simulator.knobs import Knobs
from appliance.simulator.logs import CORE, VllmLog
from appliance.simulator.memory import MemoryPlan
from appliance.simulator.metrics import EngineMetrics

# Accepted draft tokens per step cycle for MTP (mean acceptance length ~2.75 with k=3).
_ACCEPT_CYCLE = (3, 2, 4, 3, 1, 4, 3, 2)


class RequestAbortedError(Exception):
    """The engine aborted the request (vLLM's `/sleep` does so to every running and waiting
    request: `mode` defaults to "abort"); the client sees finish_reason "abort"."""

    def __init__(self, generated: int) -> None:
        super().__init__("request aborted")
        self.generated = generated


@dataclass(eq=False)  # identity-hashed: lives in the running set
class _Running:
    prompt_tokens: int
    generated: int = 0


class Engine:
    def __init__(self, args: ServeArgs, knobs: Knobs, log: VllmLog, memory: MemoryPlan) -> None:
        self.args = args
        self.knobs = knobs
        self.log = log
        self.memory = memory
        self.metrics = EngineMetrics(args.served_name, spec_decode=args.num_speculative_tokens > 0)
        self.dead = False
        self.sleep_level = 0
        self.sleeps = 0  # how many times /sleep ran: requests older than the last one are aborted
        self.awake = asyncio.Event()
        self.awake.set()
        self.slots = asyncio.Semaphore(args.max_num_seqs)
        self.running: set[_Running] = set()
        self.waiting = 0
        self._window_prompt = 0
        self._window_gen = 0
        self._window_drafts = 0
        self._window_draft_tokens = 0
        self._window_accepted = 0
        self._last_logged_busy = False

    # ------------------------------------------------------------------------------ requests

    async def run(self, prompt_tokens: int, max_new: int, finish: str) -> AsyncGenerator[int, None]:
        """Yield the number of new tokens per engine step until `max_new` are out.

        `finish` is the reason recorded when all tokens went out (stop or length); a request
        that the engine ends early is recorded as an abort; one whose client went away is not
        counted (as vLLM).
        """
        if self.dead:
            raise EngineDeadError()
        arrival = time.monotonic()
        state = _Running(prompt_tokens)
        finished = "abort"
        first: float | None = None
        last = arrival
        self.waiting += 1
        self._gauges()
        queued = True
        era = self.sleeps
        try:
            await self.awake.wait()  # arrived while asleep: queued until wake-up, not aborted
            async with self.slots:
                self._check_aborted(era, state)
                queued = False
                self.waiting -= 1
                self.running.add(state)
                self._gauges()
                self.metrics.queue_time.observe(time.monotonic() - arrival)
                prefill = prompt_tokens / self.knobs.prefill_tokens_per_s
                await self._sleep_or_die(self.knobs.ttft_ms / 1000 + prefill)
                self.metrics.prompt_tokens.inc(prompt_tokens)
                self.metrics.prefix_queries.inc(prompt_tokens)
                self._window_prompt += prompt_tokens
                rate = self.knobs.tokens_per_s
                step_no = 0
                while state.generated < max_new:
                    now = time.monotonic()
                    if first is None:
                        first = now
                        n = 1  # prefill yields one token; MTP steps follow
                        self.metrics.ttft.observe(now - arrival)
                    else:
                        n = self._step_size(step_no)
                        due = first + (state.generated + n - 1) / rate
                        if due > now:
                            await self._sleep_or_die(due - now)
                            now = time.monotonic()
                        # A lagging loop catches up by emitting every token that is due.
                        n = max(n, int((now - first) * rate) + 1 - state.generated)
                        self.metrics.itl.observe(now - last)
                    self._check_aborted(era, state)
                    n = min(n, max_new - state.generated)
                    last = now
                    self._account_step(state, n, speculative=step_no > 0)
                    step_no += 1
                    yield n
                finished = finish
        except (GeneratorExit, asyncio.CancelledError):
            # The client went away: vLLM's OutputProcessor.abort_requests drops the request
            # without finished-request stats, so request_success_total does not count it.
            finished = ""
            raise
        finally:
            if queued:
                self.waiting -= 1
            self.running.discard(state)
            self._finish(state, finished, arrival, first)

    def _check_aborted(self, era: int, state: _Running) -> None:
        if self.sleeps != era:
            raise RequestAbortedError(state.generated)

    def _step_size(self, step_no: int) -> int:
        k = self.args.num_speculative_tokens
        if k <= 0:
            return 1
        return min(_ACCEPT_CYCLE[step_no % len(_ACCEPT_CYCLE)], k + 1)

    def _account_step(self, state: _Running, n: int, *, speculative: bool) -> None:
        state.generated += n
        self.metrics.generation_tokens.inc(n)
        self._window_gen += n
        k = self.args.num_speculative_tokens
        spec = self.metrics.spec_drafts, self.metrics.spec_draft_tokens, self.metrics.spec_accepted
        if speculative and k > 0 and spec[0] and spec[1] and spec[2]:
            spec[0].inc()
            spec[1].inc(k)
            spec[2].inc(min(n - 1, k))
            self._window_drafts += 1
            self._window_draft_tokens += k
            self._window_accepted += min(n - 1, k)
        self._gauges()

    def _finish(self, state: _Running, reason: str, arrival: float, first: float | None) -> None:
        now = time.monotonic()
        if reason:
            self.metrics.success.inc(1, {"finished_reason": reason})
        self.metrics.e2e.observe(now - arrival)
        self.metrics.request_prompt.observe(state.prompt_tokens)
        self.metrics.request_generation.observe(state.generated)
        if first is not None and state.generated > 1:
            self.metrics.tpot.observe((now - first) / (state.generated - 1))
        self._gauges()

    def _gauges(self) -> None:
        self.metrics.running.set(len(self.running))
        self.metrics.waiting.set(self.waiting)
        used = sum(r.prompt_tokens + r.generated for r in self.running)
        self.metrics.kv_usage.set(min(1.0, used / max(1, self.memory.kv_tokens)))

    async def _sleep_or_die(self, seconds: float) -> None:
        # A plain sleep per step is the cheapest timer; death is noticed at the next step.
        await asyncio.sleep(max(0.0, seconds))
        if self.dead:
            raise EngineDeadError()

    # ------------------------------------------------------------------------------ life cycle

    def die(self) -> None:
        self.dead = True

    async def sleep(self, level: int) -> None:
        if self.sleep_level:
            return
        started = time.monotonic()
        self.awake.clear()
        # vLLM 0.32 `EngineCore.sleep` -> `pause_scheduler(mode="abort")`: every running and
        # waiting request finishes as aborted before the weights move (v1/engine/core.py).
        self.sleeps += 1
        await asyncio.sleep(self.knobs.sleep_s)
        self.sleep_level = level
        self.metrics.set_sleep(level)
        freed = self.memory.model_gib + (self.memory.kv_gib if level else 0)
        self.log.info(
            f"Sleep mode freed {freed:.2f} GiB memory, 1.21 GiB memory is still in use.",
            "gpu_worker.py:134",
            CORE,
        )
        self.log.info(
            f"It took {time.monotonic() - started:.6f} seconds to fall asleep.",
            "cumem.py:233",
            CORE,
        )

    async def wake_up(self, tags: list[str] | None = None) -> None:
        if not self.sleep_level:
            return
        started = time.monotonic()
        await asyncio.sleep(self.knobs.sleep_s * (2 if self.sleep_level == 1 else 4))
        self.sleep_level = 0
        self.metrics.set_sleep(0)
        self.awake.set()
        shown = set(tags or ["weights", "kv_cache"])
        self.log.info(
            f"It took {time.monotonic() - started:.6f} seconds to wake up tags {shown}.",
            "cumem.py:264",
            CORE,
        )

    # ------------------------------------------------------------------------------ stats log

    async def log_stats_forever(self) -> None:
        """vLLM's periodic "Engine 000: Avg prompt throughput ..." line while there is traffic."""
        interval = self.knobs.log_interval_s
        while True:
            await asyncio.sleep(interval)
            self.log_stats(interval)

    def log_stats(self, interval: float) -> None:
        busy = bool(self._window_prompt or self._window_gen or self.running or self.waiting)
        if not busy and not self._last_logged_busy:
            return
        self._last_logged_busy = busy
        prompt_tps = self._window_prompt / interval
        gen_tps = self._window_gen / interval
        kv = 100 * self.metrics.kv_usage.get()
        self.log.info(
            f"Engine 000: Avg prompt throughput: {prompt_tps:.1f} tokens/s, Avg generation "
            f"throughput: {gen_tps:.1f} tokens/s, Running: {len(self.running)} reqs, Waiting: "
            f"{self.waiting} reqs, GPU KV cache usage: {kv:.1f}%, Prefix cache hit rate: 0.0%",
            "loggers.py:127",
        )
        if self._window_drafts:
            mean = 1 + self._window_accepted / self._window_drafts
            rate = 100 * self._window_accepted / max(1, self._window_draft_tokens)
            self.log.info(
                f"SpecDecoding metrics: Mean acceptance length: {mean:.2f}, Accepted throughput: "
                f"{self._window_accepted / interval:.2f} tokens/s, Drafted throughput: "
                f"{self._window_draft_tokens / interval:.2f} tokens/s, Accepted: "
                f"{self._window_accepted} tokens, Drafted: {self._window_draft_tokens} tokens, "
                f"Avg Draft acceptance rate: {rate:.1f}%",
                "metrics.py:96",
            )
        self._window_prompt = self._window_gen = 0
        self._window_drafts = self._window_draft_tokens = self._window_accepted = 0
