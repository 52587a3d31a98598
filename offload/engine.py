"""The expert offload engine: a device cache of expert slots fed from a host tier, with router-predicted
prefetch and a choice, per miss, between fetching the expert and computing it on the CPU.

Mechanism (moving bytes) lives here; policy (which slot, what to evict, what to prefetch) is offload/policy.py.
On CUDA, copies from pinned RAM run on a dedicated copy stream and the compute stream waits on their events;
the host only blocks on a true miss. Disk reads (and, with device="cpu", slot copies) run on one background
worker thread. Every path computes an expert with the same `ExpertWeights.__call__` and sums the experts in
ascending id order, so logits do not depend on cache size, tier, prefetch or miss policy. On the CPU with
experts kept as GGUF bytes, one token's experts run in one native `moe_one_token` call (ascending id order too),
whichever tier each came from.

Every slot is one row of a per-layer pool tensor holding an expert's GGUF bytes laid out by that layer's
`ExpertSpec` (each layer its own types and size). On CUDA (and on the CPU under $LITE_DEVICE_KERNELS=triton) the
pools are what the grouped device kernel reads: one `moe_ffn` call runs a layer's selected experts straight from
their slot rows. On CUDA, bytes reach a slot through a fixed ring of pinned staging buffers.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from offload.experts import ExpertWeights, Raws, host_expert, moe_one_token, slot_expert, write_expert
from offload.planner import STAGING_BUFFERS  # pinned buffers in flight at once (CUDA); the planner counts them
from offload.policy import Key, SlotLRU, next_slot, plan_call, prefer_cpu, prefetch_plan
from offload.staging import StagingRing
from offload.stats import ExpertStats
from quant import native
from quant.device_kernels import ExpertSpec
from quant.qmatrix import cpu_kernel, device_kernels_forced, native_types

# Disk tier: a prefetch only moves predicted experts that are already in RAM. A speculative disk read costs more
# than it brings: at this machine's ~1 GB/s a wrong 4.9 MB read holds the disk for 5 ms, and cold-read decode ran
# 0.63x of the RAM tier with no such reads vs 0.31x with them (benchmarks/README.md "Offload").
DISK_READS_PER_PREFETCH = 0


# Token counts at which miss_policy="auto" times one expert on the CPU: the 8-bit kernels (1, 8) and the int8 or
# bf16 GEMM (64) that prefill takes from 12-16 rows (quant/prefill.py); `policy.cpu_seconds` interpolates.
CALIBRATION_TOKENS = (1, 8, 64)


def _align(n: int) -> int:
    return -(-n // 16) * 16


class ExpertEngine:
    """`ExpertBackend` (docs/DESIGN.md) over a host store and `slots_per_layer` device slots per MoE layer."""

    def __init__(
        self,
        store: Any,  # RamStore | DiskStore | None (None: every expert preloaded in `preloaded`)
        *,
        layers: list[int],
        n_experts: int,
        predict: Callable[[int, torch.Tensor, int], torch.Tensor] | None,
        device: torch.device,
        specs: dict[int, ExpertSpec],
        slots_per_layer: int,
        scope: str = "layer",
        lookahead: int = 1,
        miss_policy: str = "fetch",
        preloaded: dict[Key, Raws] | None = None,
        async_prefetch: bool | None = None,
        prefetch_width: int | None = None,
    ):
        self.store = store
        self.layers = sorted(layers)
        self.n_experts = n_experts
        self.predict = predict
        self.device = torch.device(device)
        self.cuda = self.device.type == "cuda"
        self.specs = specs
        # slots are pool rows the grouped device kernel reads (CUDA, or its interpreted twin on the CPU)
        self.pooled = self.cuda or device_kernels_forced()
        self.lookahead = lookahead if predict is not None else 0
        self.async_prefetch = self.cuda if async_prefetch is None else async_prefetch
        self.prefetch_width = prefetch_width  # experts a prediction may bring in per layer (None: every slot)
        self.lock = threading.RLock()  # the slot bookkeeping, shared with the worker's asynchronous prefetches
        self.pass_no, self.layer_now = 0, -1  # where the forward pass is (async prefetches arriving late drop)
        self._late_fills: list[tuple[Future, Key, int, Any]] = []
        self.miss_policy = miss_policy
        self.expert_bytes = max(spec.nbytes for spec in specs.values())
        self.lru = SlotLRU(self.layers, slots_per_layer, scope)
        self.slots_per_layer = slots_per_layer
        self.stats_ = ExpertStats(self.layers)
        self.plan: Any = None  # the planner's Plan and the expert stacks, set by build_experts (for callers)
        self.stacks: dict[int, Any] = {}
        self.prefetched: set[Key] = set()  # brought in by prefetch, not used yet
        self.pending: dict[int, Future] = {}  # slot -> worker job filling it (result: CUDA event or None)
        self.events: dict[int, torch.cuda.Event] = {}  # slot -> copy-done event (CUDA, RAM tier)
        self.last_use: dict[int, torch.cuda.Event] = {}  # slot -> compute done reading it (CUDA)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="lite-experts")
        self.copy_stream = torch.cuda.Stream(self.device) if self.cuda else None
        self.staging = StagingRing(STAGING_BUFFERS, _align(self.expert_bytes), pin=True) if self.cuda else None
        self.native_layers = {  # CPU decode: one native call runs a token's experts (`moe_one_token`)
            layer: not self.pooled and all(t in native_types() for t in (sp.gate_type, sp.up_type, sp.down_type))
            and cpu_kernel() == "native" and native.available()
            for layer, sp in specs.items()
        }  # fmt: skip
        self._views: dict[tuple[int, int], ExpertWeights] = {}  # (slot, layer) -> views of the slot's row
        self.pools: list[torch.Tensor] = []  # one per slot group: uint8 [slots in the group, bytes per slot]
        fixed = preloaded is not None and not self.pooled  # CPU, all resident: the mmap views themselves
        if not fixed:
            for g in range(self.lru.n_slots // self.lru.capacity):
                width = self.expert_bytes if scope == "global" else specs[self.layers[g]].nbytes
                self.pools.append(torch.zeros(self.lru.capacity, _align(width), dtype=torch.uint8, device=device))
        if preloaded is not None:  # everything resident
            for key in sorted(preloaded):
                got = self.lru.allocate(key)
                assert got is not None  # a slot per expert
                slot = got[0]
                if fixed:
                    self._views[(slot, key[0])] = host_expert(preloaded[key], specs[key[0]])
                else:
                    self._fill(key, slot, None, raws=preloaded[key])
            if self.cuda:
                torch.cuda.synchronize(self.device)
        self.in_ram = store.has if store is not None and store.on_disk else None  # disk tier: is it in RAM?
        self.cpu_cost: list[tuple[int, float]] | None = None  # measured (tokens, seconds) of one expert on the CPU
        self.copy_s: float | None = None  # seconds to copy one expert to the device tier
        if miss_policy == "auto" and store is not None:
            self._calibrate()

    # ---- mechanism -------------------------------------------------------------------------------
    def _pool_row(self, slot: int) -> tuple[torch.Tensor, int]:
        """The pool holding `slot` and its row there (SlotLRU numbers each group's slots consecutively)."""
        return self.pools[slot // self.lru.capacity], slot % self.lru.capacity

    def _slot_of(self, key: Key) -> int:
        slot = self.lru.lookup(key)
        assert slot is not None, f"{key} is not in the device cache"
        return slot

    def _slot_view(self, slot: int, layer: int) -> ExpertWeights:
        view = self._views.get((slot, layer))
        if view is None:
            pool, row = self._pool_row(slot)
            view = self._views[(slot, layer)] = slot_expert(pool[row], self.specs[layer])
        return view

    def _fill(
        self, key: Key, slot: int, last_use: torch.cuda.Event | None, raws: Any = None
    ) -> torch.cuda.Event | None:
        """Copy `key`'s GGUF bytes from the host tier into `slot` (inline, or on the worker thread)."""
        spec = self.specs[key[0]]
        pool, row = self._pool_row(slot)
        if raws is None:
            raws = self.store.read_raw(key)
        if not self.cuda:  # the pool is host memory: lay the bytes out in place
            write_expert(pool[row], raws, spec)
            return None
        assert self.staging is not None and self.copy_stream is not None
        i, buf = self.staging.take()
        write_expert(buf, raws, spec)  # pageable (mmap / disk buffer) -> pinned: a host memcpy
        with torch.cuda.stream(self.copy_stream):
            if last_use is not None:  # the slot's previous expert may still be read by queued kernels
                self.copy_stream.wait_event(last_use)
            pool[row, : spec.nbytes].copy_(buf[: spec.nbytes], non_blocking=True)  # the one PCIe crossing
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.staging.release(i, done)
        return done

    def _issue(self, key: Key, slot: int, on_worker: bool = False) -> Future | None:
        """Start bringing `key` into `slot` without waiting for it (call with `self.lock` held). An earlier fill of
        the slot still in flight lands first. From the worker thread (`on_worker`), the fill is the caller's to do
        after releasing the lock: it gets the slot's `Future` back and completes it."""
        self.stats_.add(key[0], "bytes_h2d", self.specs[key[0]].nbytes)
        last = self.last_use.pop(slot, None)
        prev = self.pending.pop(slot, None)
        self.events.pop(slot, None)  # a copy-stream event: the next copy on that stream lands after it anyway
        if on_worker:
            fut: Future = Future()
            self.pending[slot] = fut
            self._late_fills.append((fut, key, slot, last))
            return fut
        if self.cuda and not self.store.on_disk:
            if prev is not None:
                prev.result()  # a worker-issued copy into this slot: enqueue ours after it
            done = self._fill(key, slot, last)  # asynchronous on the copy stream already
            assert done is not None
            self.events[slot] = done
        else:
            self.pending[slot] = self.worker.submit(self._fill_after, prev, key, slot, last)
        return None

    def _fill_after(self, prev: Future | None, key: Key, slot: int, last: Any) -> Any:
        if prev is not None:
            prev.result()  # completed by an earlier job of this same worker: never blocks for long
        return self._fill(key, slot, last)

    def _ready(self, slot: int, layer: int, miss: bool) -> ExpertWeights:
        """The slot's expert, once its bytes are in place. Blocks the host only for a miss or a disk read."""
        t0 = time.perf_counter()
        stalled = False
        fut = self.pending.pop(slot, None)
        event = self.events.pop(slot, None)
        if fut is not None:
            stalled = not fut.done()
            event = fut.result()
        late = stalled
        if event is not None:
            late = late or not event.query()
            if miss:
                stalled = late
                event.synchronize()
            else:
                torch.cuda.current_stream(self.device).wait_event(event)  # the GPU waits, not the host
        if stalled:
            self.stats_.add(layer, "stall_s", time.perf_counter() - t0)
        if late and not miss:
            self.stats_.add(layer, "hits_late")
        return self._slot_view(slot, layer)

    def _host_expert(self, key: Key) -> ExpertWeights:
        """The host copy the CPU kernels run; disk reads go through the worker (it owns the RAM LRU)."""
        if not self.store.on_disk:
            return self.store.read_cpu(key)
        t0 = time.perf_counter()
        ex = self.worker.submit(self.store.read_cpu, key).result()
        self.stats_.add(key[0], "stall_s", time.perf_counter() - t0)
        return ex

    def _calibrate(self) -> None:
        """Measure one expert's copy time and CPU latency (at CALIBRATION_TOKENS) for miss_policy="auto"."""
        key = (self.layers[0], 0)  # slot 0 is free and belongs to layers[0]'s group: scribbling on it is harmless
        raws = self.store.read_raw(key)
        self._fill(key, 0, None, raws)  # warm up
        if self.cuda:
            torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(3):
            self._fill(key, 0, None, raws)
        if self.cuda:
            torch.cuda.synchronize(self.device)
        self.copy_s = (time.perf_counter() - t0) / 3
        cpu = self.store.read_cpu(key)
        self.cpu_cost = []
        for n in CALIBRATION_TOKENS:
            x = torch.randn(n, cpu.gate.shape[1])
            cpu(x)
            t0 = time.perf_counter()
            for _ in range(3):
                cpu(x)
            self.cpu_cost.append((n, (time.perf_counter() - t0) / 3))

    def _choose_cpu(self, n_tokens: int) -> bool:
        return prefer_cpu(self.miss_policy, n_tokens, self.cpu_cost, self.copy_s, device_free=self.cuda)

    # ---- the ExpertBackend interface ------------------------------------------------------------
    def on_residual(self, layer: int, h: torch.Tensor) -> None:
        """`h` is the residual stream leaving `layer`. Predict the experts of the next `lookahead` MoE layers
        from it and start copying them in: as many as a layer has slots, likeliest first (measured on the demo
        model: filling every slot beats keeping LRU survivors; benchmarks/README.md "Offload").

        With `async_prefetch` (the default on CUDA) the predicted ids travel to pinned host memory without
        stopping this thread, and the worker plans and issues the copies once they land: a decode step then
        blocks the host once per MoE layer (its routing), not twice."""
        if self.lookahead <= 0:
            return
        width = min(self.prefetch_width or self.slots_per_layer, self.slots_per_layer, self.n_experts)
        targets = [t for t in self.layers if layer < t <= layer + self.lookahead]
        assert self.predict is not None  # lookahead > 0 needs a predictor
        preds = [(t, self.predict(t, h, width).reshape(-1)) for t in targets]
        if not preds:
            return
        with self.lock:
            self._advance(layer)
            stamp = (self.pass_no, layer)
        if not self.async_prefetch or h.shape[0] > 1:
            for target, ids in preds:
                self._prefetch(target, ids.tolist(), stamp, on_worker=False)
            return
        host = [(t, self._to_host(ids)) for t, ids in preds]
        event = None
        if self.cuda:
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(self.device))
        self.worker.submit(self._prefetch_job, host, event, stamp)

    def _advance(self, layer: int) -> None:
        """Track where the forward pass is (call with the lock held): a lower layer starts the next pass."""
        if layer < self.layer_now:
            self.pass_no += 1
        self.layer_now = layer

    def _to_host(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [n] on the device -> a pinned host tensor, filled asynchronously (valid once the event recorded
        after this call has completed)."""
        if ids.device.type != "cuda":
            return ids
        buf = torch.empty(ids.shape, dtype=ids.dtype, pin_memory=True)  # torch's host allocator caches these
        return buf.copy_(ids, non_blocking=True)

    def _prefetch_job(self, preds: list, event: torch.cuda.Event | None, stamp: tuple[int, int]) -> None:
        if event is not None:
            event.synchronize()  # the worker waits for the ids, not the forward pass
        for target, ids in preds:
            self._prefetch(target, ids.tolist(), stamp, on_worker=True)

    def _prefetch(self, target: int, ids: list[int], stamp: tuple[int, int], on_worker: bool) -> None:
        """Plan and issue the copies for one predicted layer (predicted at `stamp`: (forward pass, layer)); on the
        worker, a prediction the forward pass has overtaken is dropped."""
        with self.lock:
            if on_worker and (self.pass_no, self.layer_now) >= (stamp[0], target):
                return  # the forward pass has reached that layer already: too late to help, and unsafe
            protected: set[Key] = set()
            if self.lru.scope == "global":  # never evict what this or the running layer holds
                protected = {k for k in self.lru.keys() if k[0] in (stamp[1], self.layer_now)}
            plan = prefetch_plan(self.lru, target, ids, protected, self.in_ram, DISK_READS_PER_PREFETCH)
            for key, slot, evicted in plan:
                if evicted is not None:
                    self.prefetched.discard(evicted)
                self._issue(key, slot, on_worker=on_worker)
                self.prefetched.add(key)
                self.stats_.add(target, "prefetches_issued")
            fills, self._late_fills = self._late_fills, []
        for fut, key, slot, last in fills:  # outside the lock: the forward pass may go on meanwhile
            try:
                fut.set_result(self._fill(key, slot, last))
            except BaseException as e:  # the waiting forward pass re-raises it
                fut.set_exception(e)

    def __call__(self, layer: int, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        # x: [T, hidden], ids: [T, k], weights: [T, k] -> [T, hidden]
        if ids.shape[0] == 1:  # decode: no sorting, no index tensors
            k = ids.shape[1]
            if self.cuda:  # ids and weights reach the host in one transfer (float64 holds both exactly)
                both = torch.cat([ids[0].double(), weights[0].double()]).tolist()
                row, w_row = [int(e) for e in both[:k]], both[k:]
            else:
                row, w_row = ids[0].tolist(), weights[0].tolist()
            experts = sorted(row)
            inputs = {e: x for e in experts}
            scale = dict(zip(row, w_row))  # python floats: no per-expert tensor indexing
            n_rows = {e: 1 for e in experts}
        else:
            k = ids.shape[1]
            flat = ids.reshape(-1).to("cpu")  # the routing decision has to reach the host (one sync per layer)
            order = torch.argsort(flat, stable=True)  # [T*k], grouped by expert
            uniq, counts = torch.unique_consecutive(flat[order], return_counts=True)
            experts, counts = uniq.tolist(), counts.tolist()
            order_dev = order.to(x.device)
            tokens = order_dev // k  # [T*k] token of each (token, choice), grouped by expert
            w = weights.reshape(-1)[order_dev]  # [T*k]
            inputs, scale, rows, n_rows, a = {}, {}, {}, {}, 0
            for e, c in zip(experts, counts):
                rows[e] = tokens[a : a + c]
                inputs[e], scale[e], n_rows[e] = x[rows[e]], w[a : a + c, None], c
                a += c

        keys = [(layer, e) for e in experts]
        with self.lock:  # the worker's asynchronous prefetches plan under the same lock
            self._advance(layer)
            plan = plan_call(self.lru, keys, lambda key: self._choose_cpu(n_rows[key[1]]))
            hits, to_cpu, deferred = plan.hits, plan.to_cpu, plan.deferred
            for key in hits:
                self.stats_.add(layer, "hits")
                if key in self.prefetched:
                    self.prefetched.discard(key)
                    self.stats_.add(layer, "prefetches_used")
            self.stats_.add(layer, "misses", len(keys) - len(hits))
            issued = []
            for key, slot, evicted in plan.issued:
                if evicted is not None:
                    self.prefetched.discard(evicted)
                self._issue(key, slot)
                issued.append(key)

        if self.pooled and not deferred and (ids.shape[0] == 1 or not to_cpu):
            return self._grouped(layer, x, ids, weights, experts, hits, issued, to_cpu, scale)
        ys: dict[int, torch.Tensor] = {}
        fused = ids.shape[0] == 1 and self.native_layers.get(layer, False)
        sources: dict[int, ExpertWeights] = {}  # fused: each expert's weights, all run at the end in one call

        def run_slot(key: Key, miss: bool) -> None:
            slot = self._slot_of(key)
            if fused:  # a deferred fetch may refill this slot before the fused call: then keep a copy
                ready = self._ready(slot, layer, miss)
                sources[key[1]] = ready.clone() if deferred else ready
            else:
                ys[key[1]] = self._ready(slot, layer, miss)(inputs[key[1]])
            if self.cuda:
                used = torch.cuda.Event()
                used.record(torch.cuda.current_stream(self.device))
                self.last_use[slot] = used

        for key in hits:
            run_slot(key, miss=False)
        for key in to_cpu:  # the CPU works while the copies of `issued` are in flight
            cpu = self._host_expert(key)
            xs = inputs[key[1]]
            if fused:
                sources[key[1]] = cpu
            else:
                ys[key[1]] = cpu(xs.to("cpu")).to(x.device) if self.cuda else cpu(xs)
            self.stats_.add(layer, "cpu_experts")
        for key in issued:
            run_slot(key, miss=True)
        remaining = set(deferred)
        for key in deferred:  # fewer slots than experts: evict ones already computed
            with self.lock:
                slot, evicted = next_slot(self.lru, key, remaining)
                if evicted is not None:
                    self.prefetched.discard(evicted)
                self._issue(key, slot)
            run_slot(key, miss=True)
            remaining.discard(key)

        if fused:
            return moe_one_token([sources[e] for e in experts], x, [scale[e] for e in experts])
        out = torch.zeros_like(x)
        for e in experts:  # fixed order: the sum does not depend on where each expert ran
            if ids.shape[0] == 1:
                out += ys[e] * scale[e]
            else:
                out.index_add_(0, rows[e], ys[e] * scale[e].to(ys[e].dtype))
        return out

    def _grouped(
        self,
        layer: int,
        x: torch.Tensor,
        ids: torch.Tensor,
        weights: torch.Tensor,
        experts: list[int],
        hits: list[Key],
        issued: list[Key],
        to_cpu: list[Key],
        scale: dict,
    ) -> torch.Tensor:
        """Every expert of the call that sits in a slot, run by one grouped device kernel from the pool rows; the
        CPU-computed ones (decode only) added after, in ascending id order."""
        from quant import device_kernels

        rows: dict[int, int] = {}
        on_device = hits + issued
        for key in on_device:
            slot = self._slot_of(key)
            self._ready(slot, layer, miss=key in issued)
            rows[key[1]] = self._pool_row(slot)[1]
        cpu_ys = [(e, self._host_expert((layer, e))(x.to("cpu")).to(x.device)) for _, e in to_cpu]
        self.stats_.add(layer, "cpu_experts", len(cpu_ys))
        pool = self._pool_row(self._slot_of(on_device[0]))[0] if on_device else None
        if ids.shape[0] == 1:  # the columns in ascending expert id order, so the k-term sum has a fixed order
            cols = [e for e in experts if e in rows]
            slot_rows = torch.tensor([[rows[e] for e in cols]], dtype=torch.int32)
            w = torch.tensor([[scale[e] for e in cols]], dtype=torch.float32)
        else:
            ids_sorted, perm = ids.sort(dim=1)
            lut = torch.zeros(self.n_experts, dtype=torch.int32)
            lut[list(rows)] = torch.tensor(list(rows.values()), dtype=torch.int32)
            slot_rows, w = lut.to(ids.device)[ids_sorted], weights.gather(1, perm).float()
        out = torch.zeros_like(x)
        if pool is not None:
            dev = x.device
            out = device_kernels.moe_ffn(
                x, pool, slot_rows.to(dev, non_blocking=True), w.to(dev, non_blocking=True), self.specs[layer]
            )
            if self.cuda:
                used = torch.cuda.Event()
                used.record(torch.cuda.current_stream(self.device))
                for key in on_device:
                    self.last_use[self.lru.lookup(key)] = used  # type: ignore[index]
        for e, y in cpu_ys:
            out += y * scale[e]
        return out

    # ---- stats --------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        return self.stats_.as_dict(
            slots_per_layer=self.slots_per_layer,
            n_experts=self.n_experts,
            expert_bytes=self.expert_bytes,
            tier="device" if self.store is None else ("disk" if self.store.on_disk else "ram"),
            prefetch_lookahead=self.lookahead,
            miss_policy=self.miss_policy,
            scope=self.lru.scope,
        )

    def reset_stats(self) -> None:
        self.stats_.reset()
        self.prefetched.clear()  # prefetches issued before the reset do not count as used after it

    def close(self) -> None:
        self.worker.shutdown(wait=True)
        if self.store is not None and hasattr(self.store, "close"):
            self.store.close()
