"""The coordinator: one detached, named, restartable actor per cluster; the small control plane.

It makes the expert shards (detached, named by slot), keeps the membership of the collective group
and its epochs (``latentmoe.cluster.membership``), hands every member each new group (expert shards by a
call, attention shards through their long-poll ``watch``), handles faults (probe, replace an expert
shard, drop a dead attention shard, re-form), and keeps the expert-load window that the dashboard shows.
It holds no stream and sits on no token's path: the shards step on their own, and requests go from the
ingress to an attention shard through Serve. If it dies, Ray restarts it (``max_restarts=-1``); it finds
its expert shards by name and the group from them, and the attention shards register again.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import time
import uuid

import ray
import torch

from latentmoe.actors.expert_shard import ExpertShardActor, expert_actor_name
from latentmoe.actors.metrics import ClusterMetrics
from latentmoe.actors.names import ROUTER_NAMESPACE
from latentmoe.actors.placement import EXPERT_RESOURCE
from latentmoe.cluster.communicator import backend_for
from latentmoe.cluster import eplb
from latentmoe.cluster.membership import ATTENTION, EXPERT, Member, Membership
from latentmoe.cluster.placement import ExpertPlacement
from latentmoe.cluster.shards import shard_runtime_env
from latentmoe.cluster.telemetry import ExpertLoadWindow
from latentmoe.engine.engine_config import EngineConfig
from latentmoe.model.config import ModelConfig

logger = logging.getLogger(__name__)


class Coordinator:
    def __init__(self, config: dict, num_expert: int, name: str, *, start_timeout_s: float = 300.0,
                 step_timeout_s: float = 120.0, recovery_timeout_s: float | None = None, fault_grace_s: float = 3.0,
                 place_by_role: bool = True):
        self.config_dict, self.name = config, name
        self.engine_config = EngineConfig.from_dict(config)
        self.model_config = ModelConfig.from_json(self.engine_config.model)
        if self.model_config.n_routed_experts is None:
            raise ValueError("a dense model has no routed experts to put on expert shards")
        # the expert placement in force (the newest group's), versioned; rebalance() makes the next one
        self.placement = eplb.ReplicatedPlacement.build(self.model_config, num_expert,
                                                        self.engine_config.redundant_experts)
        self.expert_policy = _import_policy(self.engine_config.expert_shards_policy)
        self.rebalances: list[dict] = []  # the latest placement changes (rebalances, expert shard counts), newest last
        self._rebalancing = asyncio.Lock()
        self.start_timeout_s, self.step_timeout_s = start_timeout_s, step_timeout_s
        self.recovery_timeout_s = start_timeout_s if recovery_timeout_s is None else recovery_timeout_s
        self.collective_timeout_s = step_timeout_s / 2
        self.fault_grace_s, self.place_by_role = fault_grace_s, place_by_role
        self.gpu = self.engine_config.device.startswith("cuda")
        self.backend = backend_for(self.engine_config.device)
        self.membership = Membership(num_expert)
        self.handles: dict[str, object] = {}  # member id -> its actor (attention: the replica's own actor)
        self.attention_info: dict[str, dict] = {}  # member id -> what it registered with (max_model_len, ...)
        self.load_index: dict[str, int] = {}  # attention member id -> its row in the load window
        self.incarnations: dict[int, int] = {}  # expert slot -> its latest shard's incarnation
        self.joined: dict[int, set[str]] = {}
        self._departing: set[str] = set()  # expert shards of the group in force that the next one leaves out
        self._changed = asyncio.Condition()  # notified on every new group (and on a fatal error)
        self._reforming: asyncio.Task | None = None
        self._recovering: set[int] = set()  # epochs whose fault is being handled
        self._started: asyncio.Future | None = None
        self.error: str | None = None
        self.faults: list[dict] = []
        self.num_recoveries = self.num_scale_outs = self.num_scale_ins = 0
        self.restarted = ray.get_runtime_context().was_current_actor_reconstructed
        self.incarnation = uuid.uuid4().hex  # attention shards register again when it changes
        c = self.model_config
        self.load = ExpertLoadWindow(c.n_routed_experts, num_expert, c.num_experts_per_tok)
        self.metrics = ClusterMetrics()

    # ---- start-up, and rebuilding after a restart -----------------------------------------------------------

    async def start(self) -> dict:
        """Bring up the expert shards and form the first group (idempotent); returns ``info()``."""
        if self._started is None:
            self._started = asyncio.get_running_loop().create_task(self._start())
            self._gauge_task = asyncio.get_running_loop().create_task(self._gauges())
            if self.engine_config.eplb_interval_s > 0:
                self._eplb_task = asyncio.get_running_loop().create_task(self._eplb_policy())
        await asyncio.shield(self._started)
        return self.info()

    async def _start(self) -> None:
        if self.restarted and await self._adopt():
            logger.warning("latentmoe coordinator restarted: took over epoch %d", self.membership.epoch)
            return
        infos = await asyncio.gather(*(self._new_expert(slot) for slot in range(self.num_expert)))
        for info in infos:
            self.membership.join(info["member"])
        self._schedule_reform()
        async with self._changed:  # up once the first group (the expert shards) is formed
            await self._changed.wait_for(lambda: self.membership.group is not None or self.error is not None)
        if self.error is not None:
            raise RuntimeError(self.error)

    async def _adopt(self) -> bool:
        """After a restart: the expert shards by name (their number may have changed since this coordinator was
        first made: every slot a shard could have is looked up), the group from the newest one that answers."""
        found = {}
        for slot in range(max(self.num_expert, self.model_config.n_routed_experts)):
            try:
                found[slot] = ray.get_actor(expert_actor_name(self.name, slot), namespace=ROUTER_NAMESPACE)
            except ValueError:
                continue
        if not found:
            return False
        states = await asyncio.gather(*(asyncio.wait_for(h.state.remote(), 10) for h in found.values()),
                                      return_exceptions=True)
        groups = [s["group"] for s in states if isinstance(s, dict) and s["group"] is not None]
        if not groups:
            return False
        group = max(groups, key=lambda g: g.epoch)
        experts = [m for m in group.members if m.kind == EXPERT]
        if any(m.slot not in found for m in experts):
            return False
        self.membership.num_expert = len(experts)
        self.membership.adopt(group)
        if group.placement is not None:
            self.placement = group.placement
        self.load.num_shards = self.num_expert
        for m in experts:
            self.handles[m.id] = found.pop(m.slot)
            self.incarnations[m.slot] = int(m.id.rsplit(".", 1)[1])
        for handle in found.values():  # started for an expert shard change that the restart cut short
            ray.kill(handle)
        return True

    async def _new_expert(self, slot: int, placement=None) -> dict:
        """Start the expert shard of ``slot``, loading its slots of ``placement`` (default: the one in force; a
        replacement takes the name once the dead one has let it go)."""
        name = expert_actor_name(self.name, slot)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                ray.get_actor(name, namespace=ROUTER_NAMESPACE)
            except ValueError:
                break
            await asyncio.sleep(0.2)
        self.incarnations[slot] = self.incarnations.get(slot, 0) + 1
        resources = {EXPERT_RESOURCE: 1.0} if self.place_by_role else {}
        handle = ExpertShardActor.options(
            name=name, namespace=ROUTER_NAMESPACE, lifetime="detached", max_restarts=0, num_cpus=1,
            num_gpus=1 if self.gpu else 0, resources=resources, scheduling_strategy="SPREAD",
            runtime_env=shard_runtime_env(), enable_task_events=False).remote(
                self.config_dict, placement or self.placement, slot, self._self(), self.incarnations[slot],
                self.collective_timeout_s)
        timeout_s = self.recovery_timeout_s if self._started.done() else self.start_timeout_s
        try:
            info = await asyncio.wait_for(handle.info.remote(), timeout_s)
        except asyncio.TimeoutError:
            ray.kill(handle)
            raise RuntimeError(f"expert shard {slot} could not be placed within {timeout_s:g} s: it needs "
                               f"{dict(CPU=1, **resources)}, the cluster has {ray.available_resources()} "
                               "available") from None
        except BaseException:
            ray.kill(handle)
            raise
        self.handles[info["member"].id] = handle
        return info

    @property
    def num_expert(self) -> int:
        """The expert slots in force (the membership's: ``scale_experts`` changes them, a restart adopts them)."""
        return self.membership.num_expert

    def _self(self):
        return ray.get_runtime_context().current_actor

    # ---- membership: attention shards come and go -------------------------------------------------------------

    async def register(self, member: Member, info: dict, handle, group=None) -> dict:
        """An attention shard is up (or, after a coordinator restart, still up): it joins at the next epoch."""
        await self.start()
        assert member.kind == ATTENTION, member
        self.handles[member.id] = handle
        self.attention_info[member.id] = info
        self.load_index.setdefault(member.id, len(self.load_index))
        if group is not None and self.membership.group is not None and group.epoch == self.membership.epoch:
            return self.info()  # already a member of the group in force (a re-registration)
        self.membership.join(member)
        if self.membership.group is not None and any(m.kind == ATTENTION for m in self.membership.group.members):
            self.num_scale_outs += 1
            self.metrics.scale_outs.inc()
        self._schedule_reform()
        return self.info()

    async def leave(self, member_id: str) -> None:
        """A draining attention shard goes: re-form without it (it switches out at the next boundary)."""
        if member_id in self.membership.attention:
            self.membership.leave(member_id)
            self.num_scale_ins += 1
            self.metrics.scale_ins.inc()
            self._schedule_reform()
        self.attention_info.pop(member_id, None)

    async def watch(self, member_id: str, known_epoch: int, timeout_s: float = 20.0) -> dict:
        """Long-poll of an attention shard: returns the group when there is one newer than ``known_epoch``
        (or at once on a fatal error); else ``{"group": None}`` after ``timeout_s``."""
        await self.start()
        async with self._changed:
            try:
                await asyncio.wait_for(self._changed.wait_for(
                    lambda: self.error is not None or (self.membership.group is not None
                                                       and self.membership.group.epoch > known_epoch)), timeout_s)
            except asyncio.TimeoutError:
                return {"group": None, "error": self.error, "incarnation": self.incarnation}
        return {"group": self.membership.group, "error": self.error, "incarnation": self.incarnation}

    async def joined(self, member_id: str, epoch: int) -> None:
        await self.start()
        self.joined.setdefault(epoch, set()).add(member_id)
        async with self._changed:
            self._changed.notify_all()

    def _schedule_reform(self) -> None:
        """One task forms groups at a time; it picks up every change made while it runs."""
        if self._reforming is None or self._reforming.done():
            self._reforming = asyncio.get_running_loop().create_task(self._reform())

    async def _reform(self) -> None:
        """Form new groups until the membership is what it should be (joins, leaves and faults meanwhile)."""
        for _ in range(10):
            m = self.membership
            if self.error is not None or not m.complete() or not (m.needs_new_group() or self._broken()
                                                                  or self._placement_changed()):
                return
            members = m.next_members()
            try:
                rendezvous = await asyncio.wait_for(self.handles[members[0].id].rendezvous.remote(self.backend), 30)
            except Exception as e:  # noqa: BLE001: rank 0 is gone: a fault
                await self._lost([members[0].id], f"expert shard {members[0].slot} did not answer: {e!r}")
                continue
            group = m.new_group(self.backend, rendezvous, self.placement)
            self._set_gauges()
            for member in group.members:
                if member.kind == EXPERT:
                    self.handles[member.id].assign.remote(group)
            for member_id in self._departing:  # expert shards out of this group: told too, so that they take part
                if member_id in self.handles:  # in the round that switches (parked, they would hold it) and leave
                    self.handles[member_id].assign.remote(group)
            previous_attention = [i for i in self.handles if i.startswith("attention") and i not in group.attention_ids]
            async with self._changed:
                self._changed.notify_all()  # attention shards' watches return the new group
            for member_id in previous_attention:  # left: they heard it through their watch
                self.handles.pop(member_id, None)
            missing = await self._wait_joined(group)
            if not missing:
                logger.info("latentmoe coordinator: epoch %d formed: %d members", group.epoch, group.world_size)
                continue
            await self._probe_and_drop(group, f"did not join epoch {group.epoch}: {sorted(missing)}")
        logger.error("latentmoe coordinator: membership did not settle after 10 groups")

    async def _wait_joined(self, group) -> set[str]:
        ids = {m.id for m in group.members}
        deadline = time.monotonic() + self.collective_timeout_s + 30
        async with self._changed:
            while not ids <= self.joined.get(group.epoch, set()):
                left = deadline - time.monotonic()
                if left <= 0 or self.membership.epoch != group.epoch:
                    break
                try:
                    await asyncio.wait_for(self._changed.wait(), left)
                except asyncio.TimeoutError:
                    break
        return ids - self.joined.get(group.epoch, set())

    def _broken(self) -> bool:
        return self.membership.epoch in self._recovering

    def _placement_changed(self) -> bool:
        group = self.membership.group
        return group is not None and getattr(group.placement, "version", None) != self.placement.version

    # ---- expert load balancing ----------------------------------------------------------------------------------

    async def rebalance(self, force: bool = True, window_s: float | None = None, mode: str | None = None) -> dict:
        """Build the next expert placement from the expert load of the last ``window_s`` seconds (default
        ``eplb_window_s``) and switch to it: the expert shards load their new slots while the steps go on, then
        one group under a new epoch carries the placement, and every member switches at the same step boundary
        (nothing in flight is lost; outputs do not change: copies hold the same weights). ``mode``: ``eplb_mode``
        ("copies": move only the copies; "repack": groups packed onto shards by load too). Without ``force``, only
        if the expert shards' work imbalance is above ``eplb_threshold`` and the new placement lowers it. Returns
        what it did and why, with its parts' times."""
        await self.start()
        window_s = self.engine_config.eplb_window_s if window_s is None else window_s
        mode = self.engine_config.eplb_mode if mode is None else mode
        if mode not in ("copies", "repack"):
            raise ValueError(f"mode must be 'copies' or 'repack', got {mode!r}")
        self._check_window(window_s)
        async with self._rebalancing:
            started = time.monotonic()
            summary, load = self._measured_load(window_s)
            report = {"time": time.time(), "kind": "rebalance", "version": self.placement.version,
                      "window_s": window_s, "mode": mode, "forced": force, "changed": False}
            if load is None:
                return report | {"reason": f"no expert load measured in the last {window_s:g} s"}
            S, redundant = self.num_expert, self.engine_config.redundant_experts
            new = eplb.rebalance(self.model_config, load, S, redundant, version=self.placement.version + 1,
                                 keep_primaries=self.placement if mode == "copies" else None)
            before, after = eplb.imbalance(self.placement, load), eplb.imbalance(new, load)
            report |= {"imbalance_before": round(before, 4), "imbalance_predicted": round(after, 4),
                       "measured_work_imbalance": summary["shard_work_imbalance"],
                       "plan_s": round(time.monotonic() - started, 4)}
            if (new.physical, new.share, new.primary_shard) == (self.placement.physical, self.placement.share,
                                                                 self.placement.primary_shard):
                return report | {"reason": "the placement in force is already the balanced one"}
            if not force and not (before > self.engine_config.eplb_threshold and after < before * 0.95):
                return report | {"reason": f"imbalance {before:.3f} (threshold {self.engine_config.eplb_threshold:g})"
                                           f", {after:.3f} after: not worth a switch"}
            changes = eplb.slot_changes(self.placement, new)
            group = self.membership.group
            experts = [m for m in group.members if m.kind == EXPERT]
            load_start = time.monotonic()
            loads = await asyncio.gather(*(asyncio.wait_for(self.handles[m.id].prepare.remote(new),
                                                            self.recovery_timeout_s) for m in experts))
            report["load_s"] = round(time.monotonic() - load_start, 3)
            report["shard_load_s"] = [r["load_s"] for r in loads]
            switch_start = time.monotonic()
            self.placement = new
            self._schedule_reform()
            await asyncio.shield(self._reforming)
            switched = getattr(self.membership.group.placement, "version", None) == new.version
            report |= {"changed": switched, "version": self.placement.version, "slots_loaded": len(changes),
                       "copies": new.num_copies, "epoch": self.membership.epoch,
                       "switch_s": round(time.monotonic() - switch_start, 3),
                       "total_s": round(time.monotonic() - started, 3)}
            if not switched:
                report["reason"] = "the group did not re-form with the new placement"
            self.rebalances = (self.rebalances + [report])[-20:]
            if switched:
                self.metrics.rebalances.inc()
                self.metrics.rebalance_seconds.set(report["total_s"])
            logger.info("latentmoe coordinator: placement v%d: %s", new.version, report)
            return report

    def _measured_load(self, window_s: float) -> tuple[dict, torch.Tensor | None]:
        """The load window's summary and the tokens per expert summed over the MoE layers (None if nothing)."""
        summary = self.load.summary(float(window_s))
        rows = list(summary["tokens_per_expert"].values())
        load = torch.tensor(rows, dtype=torch.float64).sum(0) if rows else None
        return summary, load if load is not None and float(load.sum()) > 0 else None

    async def scale_experts(self, num_expert: int, window_s: float | None = None) -> dict:
        """Change the number of expert shards to ``num_expert`` under live traffic. The placement over the new
        number is balanced on the expert load of the last ``window_s`` seconds (default ``eplb_window_s``), or
        is the start-up one when nothing was measured; the new shards start with their slots and the staying
        ones load theirs while the steps go on; then one group under a new epoch, which every member switches
        to at the same step boundary; the shards past the new number stop after it. Nothing in flight is lost
        and outputs do not change. Returns what it did, with its parts' times (``start_s``: the new shards up,
        Ray's autoscaler bringing their nodes included; ``load_s``; ``switch_s``; ``stop_s``)."""
        await self.start()
        if isinstance(num_expert, bool) or not isinstance(num_expert, int) or num_expert < 1:
            raise ValueError(f"num_expert must be a positive integer, got {num_expert!r}")
        window_s = self.engine_config.eplb_window_s if window_s is None else window_s
        self._check_window(window_s)
        async with self._rebalancing:
            started, before = time.monotonic(), self.num_expert
            report = {"time": time.time(), "kind": "expert_shards", "version": self.placement.version,
                      "window_s": window_s, "expert_shards_before": before, "expert_shards": num_expert,
                      "changed": False}
            if num_expert == before:
                return report | {"reason": f"the cluster has {before} expert shards already"}
            if self.error is not None or self.membership.group is None:
                raise RuntimeError(f"the cluster is not serving: {self.error or 'no group formed yet'}")
            ExpertPlacement.build(self.model_config, num_expert)  # refuses what start-up refuses (groups not whole)
            _, load = self._measured_load(window_s)
            redundant, version = self.engine_config.redundant_experts, self.placement.version + 1
            new = eplb.ReplicatedPlacement.build(self.model_config, num_expert, redundant, version=version) \
                if load is None else eplb.rebalance(self.model_config, load, num_expert, redundant, version=version)
            report["balanced_on_load"] = load is not None
            up_start = time.monotonic()
            infos = await asyncio.gather(*(self._new_expert(slot, new) for slot in range(before, num_expert)),
                                         return_exceptions=True)
            failed = [i for i in infos if isinstance(i, BaseException)]
            if failed:
                for info in infos:
                    if not isinstance(info, BaseException):
                        ray.kill(self.handles.pop(info["member"].id))
                raise RuntimeError(f"{len(failed)} of {num_expert - before} new expert shards did not come up: "
                                   f"{failed[0]!r}")
            report["start_s"] = round(time.monotonic() - up_start, 3)
            staying = [m for m in self.membership.group.members if m.kind == EXPERT and m.slot < num_expert]
            load_start = time.monotonic()
            loads = await asyncio.gather(*(asyncio.wait_for(self.handles[m.id].prepare.remote(new),
                                                            self.recovery_timeout_s) for m in staying))
            report |= {"load_s": round(time.monotonic() - load_start, 3), "shard_load_s": [r["load_s"] for r in loads]}
            switch_start = time.monotonic()
            gone = self.membership.resize(num_expert, [info["member"] for info in infos])
            self._departing = {member.id for member in gone}
            self.placement, self.load.num_shards = new, num_expert
            self._schedule_reform()
            await asyncio.shield(self._reforming)
            group = self.membership.group
            switched = getattr(group.placement, "version", None) == new.version and len(group.expert_ranks) == \
                num_expert
            report["switch_s"] = round(time.monotonic() - switch_start, 3)
            stop_start = time.monotonic()
            self._departing = set()
            for member in gone:  # they left with the switch: nothing reaches them any more
                handle = self.handles.pop(member.id, None)
                if handle is not None:
                    ray.kill(handle)
            report |= {"changed": switched, "version": self.placement.version, "epoch": self.membership.epoch,
                       "copies": new.num_copies, "max_devices_per_token": new.max_devices_per_token,
                       "stop_s": round(time.monotonic() - stop_start, 3),
                       "total_s": round(time.monotonic() - started, 3)}
            if not switched:
                report["reason"] = "the group did not re-form with the new expert shards"
            self.rebalances = (self.rebalances + [report])[-20:]
            if switched:
                self.metrics.expert_shard_changes.inc()
            logger.info("latentmoe coordinator: %d -> %d expert shards: %s", before, num_expert, report)
            return report

    async def _eplb_policy(self) -> None:
        """Every ``eplb_interval_s``: the number of expert shards the ``expert_shards_policy`` wants, if it wants
        another; else rebalance when the imbalance is over the threshold (rate-limited by the interval itself; a
        failed attempt is logged and tried again next time)."""
        while True:
            await asyncio.sleep(self.engine_config.eplb_interval_s)
            if self.error is not None or self.membership.group is None:
                continue
            try:
                wanted = self._wanted_expert_shards()
                if wanted is not None and wanted != self.num_expert:
                    await self.scale_experts(wanted)
                else:
                    await self.rebalance(force=False)
            except Exception:  # noqa: BLE001: an expert shard slow or gone: the fault path handles it
                logger.exception("latentmoe coordinator: the expert placement policy failed")

    def _wanted_expert_shards(self) -> int | None:
        if self.expert_policy is None:
            return None
        window_s = self.engine_config.eplb_window_s
        wanted = self.expert_policy(self.load.summary(float(window_s)), self.num_expert,
                                    **self.engine_config.expert_shards_policy_args)
        if wanted is not None and (isinstance(wanted, bool) or not isinstance(wanted, int) or wanted < 1):
            raise ValueError(f"expert_shards_policy returned {wanted!r}: a positive integer or None")
        return wanted

    def _check_window(self, window_s) -> None:
        if isinstance(window_s, bool) or not isinstance(window_s, (int, float)) or \
                not 0 < window_s <= self.load.horizon_s:
            raise ValueError(f"window_s must be in (0, {self.load.horizon_s:g}], got {window_s!r}")

    def _experts_per_shard(self) -> list[list[int]]:
        """The logical experts each expert shard holds (copies included, empty slots left out)."""
        return [[e for e in self.placement.experts_on(s) if e >= 0] for s in range(self.num_expert)]

    def placement_info(self) -> dict:
        """The placement in force, for ``/v1/expert-load`` and the dashboard."""
        p = self.placement
        return {"version": p.version, "slots_per_shard": p.slots_per_shard, "num_copies": p.num_copies,
                "copies_per_expert": [len(c) for c in p.copies], "slots": [list(r) for r in p.physical],
                "primary_shard": list(p.primary_shard), "rebalances": self.rebalances[-5:]}

    # ---- faults ---------------------------------------------------------------------------------------------

    async def fault(self, member_id: str, epoch: int, error: str) -> None:
        """A member's collective failed in ``epoch``: find who is gone, replace or drop them, re-form."""
        await self.start()
        if epoch != self.membership.epoch or epoch in self._recovering:
            return
        self._recovering.add(epoch)
        started = time.monotonic()
        await asyncio.sleep(self.fault_grace_s)  # the others fail too; let the dust settle
        group = self.membership.group
        what = await self._probe_and_drop(group, error)
        self._schedule_reform()
        await asyncio.shield(self._reforming)
        self._recovering.discard(epoch)
        if self.membership.epoch > epoch and self.error is None:
            self.num_recoveries += 1
            self.metrics.recoveries.inc()
        self._record_fault(what or f"the step failed ({error})",
                           "cluster down: " + self.error if self.error else "recovered", started)

    async def _probe_and_drop(self, group, why: str) -> str:
        """Ping every member of ``group``; drop the dead attention shards, replace the dead expert shards."""
        async def probe(member):
            handle = self.handles.get(member.id)
            if handle is None:
                return False
            try:
                if member.kind == EXPERT:
                    await asyncio.wait_for(handle.ping.remote(), 5)
                else:
                    await asyncio.wait_for(handle.__ray_ready__.remote(), 5)
                return True
            except Exception:  # noqa: BLE001: dead, hung, or its loop stopped
                return False

        alive = await asyncio.gather(*(probe(m) for m in group.members))
        lost = [m.id for m, ok in zip(group.members, alive) if not ok]
        if lost:
            await self._lost(lost, why)
        return ", ".join(f"{i} {'hung or died'}" for i in lost)

    async def _lost(self, member_ids: list[str], why: str) -> None:
        logger.warning("latentmoe coordinator: lost %s (%s)", member_ids, why)
        slots = []
        for member_id in member_ids:
            member = self.membership.drop(member_id)
            handle = self.handles.pop(member_id, None)
            kind = member.kind if member is not None else ATTENTION
            self.metrics.shard_faults.inc(tags={"kind": kind})
            if handle is not None:
                ray.kill(handle)  # dead already, or hung: make sure it is gone (Serve replaces a replica)
            if member is not None and member.kind == EXPERT:
                slots.append(member.slot)
            self.attention_info.pop(member_id, None)
        results = await asyncio.gather(*(self._new_expert(s) for s in slots), return_exceptions=True)
        for slot, info in zip(slots, results):
            if isinstance(info, BaseException):
                self._fatal(f"expert shard {slot} died and its replacement did not come up: {info!r}")
                return
            self.membership.join(info["member"])

    def _fatal(self, message: str) -> None:
        logger.error("latentmoe coordinator: %s", message)
        self.error = message

        async def notify():
            async with self._changed:
                self._changed.notify_all()

        asyncio.get_running_loop().create_task(notify())

    def _record_fault(self, what: str, outcome: str, started: float) -> None:
        self.faults = (self.faults + [{"time": time.time(), "fault": what, "outcome": outcome,
                                       "seconds": round(time.monotonic() - started, 3)}])[-20:]

    # ---- telemetry --------------------------------------------------------------------------------------------

    async def report_load(self, member_id: str, snapshot: dict, cache: dict) -> None:
        """An attention shard's cumulative dispatch statistics and cache state, about once a second."""
        await self.start()
        index = self.load_index.setdefault(member_id, len(self.load_index))
        if member_id in self.attention_info:
            self.attention_info[member_id]["cache"] = cache
        delta = self.load.update(index, snapshot)
        if delta is None:
            return
        for s, n in enumerate(delta.tokens_per_shard):
            if n:
                self.metrics.shard_tokens.inc(n, tags={"shard": str(s)})
        for devices, n in enumerate(delta.devices_histogram):
            if n:
                self.metrics.devices.inc(n, tags={"devices": str(devices)})
        if delta.a2a_bytes:
            self.metrics.a2a_bytes.inc(delta.a2a_bytes)

    async def _gauges(self) -> None:
        """Ray drops a gauge's value at each scrape unless it is set again: set them every 2 s, idle or not."""
        while True:
            self._set_gauges()
            await asyncio.sleep(2.0)

    def _set_gauges(self) -> None:
        group = self.membership.group
        self.metrics.live_shards.set(len(group.attention_ids) if group else 0, tags={"kind": ATTENTION})
        self.metrics.live_shards.set(len(self.membership.experts), tags={"kind": EXPERT})
        recent = self.load.summary(10.0)
        for layer in self.model_config.moe_layers:  # every layer, 0 when idle: a series never set again vanishes
            self.metrics.layer_imbalance.set(recent["imbalance_per_layer"].get(str(layer), 0.0),
                                             tags={"layer": str(layer)})
        self.metrics.shard_imbalance.set(recent["shard_imbalance"])
        self.metrics.shard_work_imbalance.set(recent["shard_work_imbalance"])
        self.metrics.placement_version.set(self.placement.version)
        self.metrics.expert_copies.set(self.placement.num_copies)

    async def expert_load(self, window_s: float = 60.0) -> dict:
        """The (layer x expert) counts, per-shard load and devices per token over the last ``window_s`` seconds."""
        self._check_window(window_s)
        return self.load.summary(float(window_s)) | {
            "max_devices_per_token": self.placement.max_devices_per_token,
            "experts_per_shard": self._experts_per_shard(),
            "placement": self.placement_info()}

    def info(self) -> dict:
        group = self.membership.group
        lens = [i["max_model_len"] for i in self.attention_info.values() if "max_model_len" in i]
        return {"model": self.engine_config.model, "vocab_size": self.model_config.vocab_size,
                "placement": self.placement, "num_expert": self.num_expert, "epoch": self.membership.epoch,
                "attention_shards": len(group.attention_ids) if group else 0,
                "expert_shards": len(self.membership.experts), "max_model_len": min(lens) if lens else None,
                "experts_per_shard": self._experts_per_shard(),
                "max_devices_per_token": self.placement.max_devices_per_token, "error": self.error}

    async def status(self) -> dict:
        """Health and counters: live shards, epoch, faults, scale events (``/health`` shows it)."""
        await self.start()
        caches = [i.get("cache", {}) for i in self.attention_info.values()]
        num_steps, step_s = sum(c.get("num_steps", 0) for c in caches), sum(c.get("step_s", 0.0) for c in caches)
        return self.info() | {
            "num_recoveries": self.num_recoveries, "num_scale_outs": self.num_scale_outs,
            "num_scale_ins": self.num_scale_ins, "faults": self.faults, "restarted": self.restarted,
            "members": [m.id for m in self.membership.group.members] if self.membership.group else [],
            # the attention shards' own step time (their step loops' wall time per step, idle passes included),
            # and its two sums, for the mean over a window (benchmarks/bench_serve.py: TPOT against it)
            "step_ms": 1e3 * step_s / max(1, num_steps), "num_steps": num_steps, "step_s": step_s,
            "num_running": sum(c.get("num_running", 0) for c in caches),
            "num_waiting": sum(c.get("num_waiting", 0) for c in caches),
            "node_id": ray.get_runtime_context().get_node_id()}

    async def shards(self) -> dict:
        """The live shards' actor handles and where they run (for operators, and for fault tests)."""
        await self.start()
        group = self.membership.group
        experts = [m for m in group.members if m.kind == EXPERT] if group else []
        infos = await asyncio.gather(*(asyncio.wait_for(self.handles[m.id].info.remote(), 30) for m in experts))
        return {"expert": [(self.handles[m.id], i) for m, i in zip(experts, infos)],
                "attention": [(self.handles.get(i), self.attention_info.get(i, {}))
                              for i in (group.attention_ids if group else [])]}

    async def shutdown(self) -> None:
        """Stop the expert shards (attention shards belong to Serve, or to the offline ``LLM``)."""
        for member_id, handle in list(self.handles.items()):
            if member_id.startswith("expert"):
                ray.kill(handle)
        self.handles.clear()


def _import_policy(path: str | None):
    """The function ``module:function`` names (``ValueError`` saying why it cannot be had)."""
    if path is None:
        return None
    module, _, name = path.partition(":")
    try:
        policy = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"expert_shards_policy {path!r} cannot be imported: {e}") from None
    if not callable(policy):
        raise ValueError(f"expert_shards_policy {path!r} is not callable")
    return policy


CoordinatorActor = ray.remote(Coordinator)
