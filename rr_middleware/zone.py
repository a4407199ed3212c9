"""Pool state shared by the worker processes of one deployment: nginx's upstream ``zone``.

Production runs several worker processes (``rr-gateway`` with ``workers = N``, ``uvicorn
--workers N``, gunicorn). Without a zone each is a balancer of its own: a scrape shows one
worker's share, each probes every upstream, each learns a dead upstream by itself. With
one (``Balancer(pools, zone="name")``), the workers naming the same zone behave as one:

- **What the pools decide is shared**: active health (written by the one process that
  probes), passive ejection and its half-open probe (one request across all workers),
  drain and weight overrides. A worker sees a change at its next pick: each pool has a
  generation number, bumped by every change, that a pick compares with the one it last
  read (one memory read; the state is reloaded only when it moved).
- **What the workers count is summed**: each worker owns a slot of counters per upstream,
  written by it alone (no locks), flushed from its in-process counters every
  ``FLUSH_INTERVAL`` and before every read; a read sums every slot ever used. A worker
  that dies leaves its counts in its slot, and the one that takes the slot next carries
  on from them: totals never go backwards. Gauges (in flight, WebSockets) count only live
  workers.
- **One prober**: the process holding the leader lock runs the active checks; the others
  try to take the lock every check interval, so one of them takes over within an
  interval of the leader's death (the OS releases a dead process's locks).

Why not ``prometheus_client``'s multiprocess mode: it does not support custom collectors,
and it shares counters only, not decisions. Why a file and not
``multiprocessing.shared_memory``: its resource tracker unlinks a segment when the
process that made it exits, and it offers no locks; here the region is an ``mmap`` of a
file (under ``/dev/shm`` unless the zone names a directory), with ``flock`` locks on
small files beside it, which die with their holder.

The region's life: the first process to attach creates it, or rebuilds what a crashed
earlier run left (a region nobody is attached to is never trusted); the others attach to
it and check that it was built for the same pools (a fingerprint of the layout), refusing
to start otherwise; the last to detach removes it.

Writes (health, ejection, drain, membership) take one exclusive ``flock`` for a few
microseconds; a pool's generation is odd while its records are written (a seqlock), so a
reader never takes a half-written state.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import math
import mmap
import os
import struct
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .counters import BUCKETS, UpstreamStats
from .health import CheckResult, UpstreamHealth

if TYPE_CHECKING:
    from .members import Member

__all__ = [
    "DISCOVERED_CAPACITY",
    "FLUSH_INTERVAL",
    "WORKER_SLOTS",
    "Zone",
    "ZoneError",
    "layout_digest",
]

logger = logging.getLogger("rr_middleware")

ZONE_ENV = "RR_MIDDLEWARE_ZONE"
#: Worker processes one zone can hold at once (a restarted worker reuses a dead one's).
WORKER_SLOTS = 64
#: Upstream records of a pool that follows discovery (a static pool has one per upstream).
DISCOVERED_CAPACITY = 256
#: Seconds between two flushes of a worker's counters into its slot.
FLUSH_INTERVAL = 0.5

_MAGIC = 0x52525A4F4E453031  # "RRZONE01"
_VERSION = 1
_HEADER_WORDS = 16
_POOL_WORDS = 4  # generation, capacity, first record, spare

# Shared health block of a record (int64 words; ``f`` marks a float64).
(
    H_USED,
    H_ID0,
    H_ID1,
    H_HEALTHY,
    H_CHECK_PASSES,
    H_CHECK_FAILS,
    H_LAST_OK,
    H_LAST_STATUS,
    H_LAST_AT,  # f
    H_LAST_LATENCY,  # f
    H_FAILS,
    H_WINDOW_START,  # f
    H_EJECTED_UNTIL,  # f, NaN: not ejected
    H_HALF_OPEN,
    H_PROBING,
    H_PROBE_DEADLINE,  # f
    H_RECOVERED_AT,  # f, NaN: none
    H_DRAINED,
    H_WEIGHT,  # -1: the configured weight
    H_CHECKS_PASS,
    H_CHECKS_FAIL,
    H_CHECK_TRANSITIONS,
    H_ERROR_LEN,
) = range(23)
H_ERROR = 23
_ERROR_BYTES = 128
_HEALTH_WORDS = H_ERROR + _ERROR_BYTES // 8
_FLOAT_FIELDS = frozenset(
    {H_LAST_AT, H_LAST_LATENCY, H_WINDOW_START, H_EJECTED_UNTIL, H_PROBE_DEADLINE, H_RECOVERED_AT}
)

#: Failure kinds with a counter of their own; a status in ``unhealthy_statuses`` is
#: counted by code.
KINDS = (
    "connect",
    "connect_timeout",
    "timeout",
    "reset",
    "protocol",
    "request",
    "error",
    "pool_timeout",
    "no_upstream",
)
_KIND_INDEX = {kind: index for index, kind in enumerate(KINDS)}
_CODES = 500  # statuses 100..599
_STATUS_FAILURES = 200  # statuses 400..599
_HIST = len(BUCKETS) + 2  # buckets, +Inf, sum (f)
(C_SUCCESSES, C_RETRIES, C_EJECTIONS, C_TRANSITIONS, C_BYTES_IN, C_BYTES_OUT) = range(6)
C_IN_FLIGHT, C_WEBSOCKETS = 6, 7  # gauges
C_KINDS = 8
C_CODES = C_KINDS + len(KINDS)
C_STATUS_FAILURES = C_CODES + _CODES
C_HEADERS_HIST = C_STATUS_FAILURES + _STATUS_FAILURES
C_TOTAL_HIST = C_HEADERS_HIST + _HIST
_COUNTER_WORDS = C_TOTAL_HIST + _HIST
_GAUGES = (C_IN_FLIGHT, C_WEBSOCKETS)
_DOUBLE = struct.Struct("d")


class ZoneError(RuntimeError):
    """A zone cannot be used: its files cannot be made, it is in use by a deployment
    with other pools, or it is full."""


def zone_directory(zone: str) -> Path:
    """Where a zone's files live: a name is a directory under ``/dev/shm`` (the system's
    temporary directory where there is none); anything with a ``/`` is the directory."""
    if "/" in zone or os.sep in zone:
        return Path(zone)
    base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
    return base / f"rr-middleware-{zone}"


def identity_hash(identity: str) -> tuple[int, int]:
    digest = hashlib.blake2b(identity.encode("utf-8"), digest_size=16).digest()
    first, second = struct.unpack("<qq", digest)
    return first, second


class PoolLayout:
    """What a zone holds for one pool: its prefix and its records (one per static
    upstream, in order, or ``DISCOVERED_CAPACITY`` for a pool that follows discovery)."""

    def __init__(self, prefix: str, identities: Sequence[str], discovered: bool) -> None:
        self.prefix = prefix
        self.identities = tuple(identities)
        self.discovered = discovered
        self.capacity = DISCOVERED_CAPACITY if discovered else len(self.identities)

    def describe(self) -> dict[str, Any]:
        return {"prefix": self.prefix, "capacity": self.capacity, "static": self.identities}


class Zone:
    """One attached zone (see the module docstring). ``attach()`` makes or joins the
    region and claims a worker slot; ``detach()`` lets them go (the last one out removes
    the files)."""

    def __init__(self, name: str, layouts: Sequence[PoolLayout]) -> None:
        self.name = name
        self.directory = zone_directory(name)
        self.layouts = list(layouts)
        self._fingerprint = _fingerprint(self.layouts)
        self._record_words = _HEALTH_WORDS + WORKER_SLOTS * _COUNTER_WORDS
        self._records_start = _HEADER_WORDS + _POOL_WORDS * len(self.layouts)
        total = sum(layout.capacity for layout in self.layouts)
        self._size = 8 * (self._records_start + total * self._record_words)
        self._files: dict[str, int] = {}
        self._map: mmap.mmap | None = None
        self.ints: memoryview | None = None
        self.slot = -1
        self.leading = False
        #: Whether this process built the region (no other was attached to it).
        self.created = False

    # -- life -------------------------------------------------------------------------------

    def attach(self) -> None:
        try:
            init = self._lock_init()
            try:
                self._attach_locked()
            finally:
                fcntl.flock(init, fcntl.LOCK_UN)
        except OSError as exc:
            self._close_files()
            raise ZoneError(f"zone {self.name!r} ({self.directory}): {exc}") from exc

    def _lock_init(self) -> int:
        """Hold the zone's init lock. The last process out removes the zone's files, so
        a lock taken on a file that was removed meanwhile is taken again on the new one."""
        path = self.directory / "init.lock"
        for _ in range(100):
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = self._open("init.lock")
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    return fd
            except FileNotFoundError:
                pass
            os.close(self._files.pop("init.lock"))
        raise ZoneError(f"zone {self.name!r} ({self.directory}): its files keep changing")

    def _attach_locked(self) -> None:
        attached = self._open("attached.lock")
        path = self.directory / "state"
        alone = _try_flock(attached, fcntl.LOCK_EX)
        if alone:
            existed = path.exists()
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
            os.ftruncate(fd, self._size)
            self._map_file(fd)
            self._write_header()
            if existed:
                logger.warning(
                    "zone %s: a region left by an earlier run was rebuilt, not trusted",
                    self.name,
                )
            fcntl.flock(attached, fcntl.LOCK_SH)  # from exclusive: others may join now
            self.created = True
        else:
            fcntl.flock(attached, fcntl.LOCK_SH)
            fd = os.open(path, os.O_RDWR)
            if os.fstat(fd).st_size != self._size:
                os.close(fd)
                raise ZoneError(self._mismatch())
            self._map_file(fd)
            if not self._header_matches():
                self._unmap()
                raise ZoneError(self._mismatch())
        self.slot = self._claim_slot()
        self._zero_gauges()

    def _mismatch(self) -> str:
        return (
            f"zone {self.name!r} ({self.directory}) is in use by a deployment with other pools; "
            "give this one another zone, or stop the other"
        )

    def detach(self) -> None:
        if self._map is None:
            return
        self._zero_gauges()
        if self.leading and self.ints is not None and self.ints[10] == os.getpid():
            self.ints[10] = 0
        try:
            init = self._lock_init()
            attached = self._files["attached.lock"]
            fcntl.flock(attached, fcntl.LOCK_UN)
            last = _try_flock(attached, fcntl.LOCK_EX)
            self._unmap()
            if last:  # the init lock is held: no one can be joining
                names = ["state", "leader.lock", "write.lock", "attached.lock"]
                for name in [*names, *self._slot_files(), "init.lock"]:
                    with contextlib.suppress(FileNotFoundError):
                        (self.directory / name).unlink()
                with contextlib.suppress(OSError):
                    self.directory.rmdir()  # unless the user's files are there too
            fcntl.flock(init, fcntl.LOCK_UN)
        finally:
            self._close_files()
            self.slot = -1
            self.leading = False

    # -- the prober ---------------------------------------------------------------------------

    def lead(self) -> bool:
        """True if this process runs the active checks: it holds the leader lock, or just
        took it (the previous holder died or detached)."""
        if not self.leading and self._map is not None:
            self.leading = _try_flock(self._open("leader.lock"), fcntl.LOCK_EX)
            if self.leading:
                assert self.ints is not None
                self.ints[10] = os.getpid()
                logger.info(
                    "zone %s: this worker (pid %d) runs the health checks", self.name, os.getpid()
                )
        return self.leading

    def describe(self) -> dict[str, Any]:
        """For the status page: the zone, this worker's slot, the live workers and the pid
        of the process running the health checks (0: none yet)."""
        ints = self.ints
        return {
            "name": self.name,
            "directory": str(self.directory),
            "worker": self.slot,
            "workers": len(self.live_slots()) if ints is not None else 0,
            "prober_pid": ints[10] if ints is not None else 0,
        }

    # -- pools --------------------------------------------------------------------------------

    def pool(self, index: int) -> ZonePool:
        return ZonePool(self, index, self.layouts[index])

    @contextlib.contextmanager
    def writing(self, pool: int) -> Iterator[None]:
        """Exclusive, and the pool's generation odd while its records change."""
        ints = self.ints
        assert ints is not None
        lock = self._open("write.lock")
        fcntl.flock(lock, fcntl.LOCK_EX)
        word = _HEADER_WORDS + _POOL_WORDS * pool
        ints[word] += 1
        try:
            yield
        finally:
            ints[word] += 1
            fcntl.flock(lock, fcntl.LOCK_UN)

    def generation(self, pool: int) -> int:
        ints = self.ints
        return ints[_HEADER_WORDS + _POOL_WORDS * pool] if ints is not None else 0

    def record_word(self, pool: int, record: int) -> int:
        ints = self.ints
        assert ints is not None
        return ints[_HEADER_WORDS + _POOL_WORDS * pool + 2] + record * self._record_words

    def live_slots(self) -> list[int]:
        """Slots of the workers attached now (a slot's lock is held while its worker lives)."""
        live = []
        for slot in range(self.used_slots()):
            if slot == self.slot:
                live.append(slot)
                continue
            fd = self._open(f"slot-{slot}.lock")
            if _try_flock(fd, fcntl.LOCK_EX):
                fcntl.flock(fd, fcntl.LOCK_UN)  # nobody holds it: its worker is gone
            else:
                live.append(slot)
        return live

    def used_slots(self) -> int:
        ints = self.ints
        return ints[9] if ints is not None else 0

    def slot_word(self, record_word: int, slot: int) -> int:
        return record_word + _HEALTH_WORDS + slot * _COUNTER_WORDS

    def float_at(self, word: int) -> float:
        assert self._map is not None
        value: float = _DOUBLE.unpack_from(self._map, 8 * word)[0]
        return value

    def set_float(self, word: int, value: float) -> None:
        assert self._map is not None
        _DOUBLE.pack_into(self._map, 8 * word, value)

    # -- internals ----------------------------------------------------------------------------

    def _open(self, name: str) -> int:
        fd = self._files.get(name)
        if fd is None:
            fd = os.open(self.directory / name, os.O_RDWR | os.O_CREAT, 0o600)
            self._files[name] = fd
        return fd

    def _slot_files(self) -> list[str]:
        return [f"slot-{slot}.lock" for slot in range(WORKER_SLOTS)]

    def _claim_slot(self) -> int:
        for slot in range(WORKER_SLOTS):
            fd = self._open(f"slot-{slot}.lock")
            if _try_flock(fd, fcntl.LOCK_EX):
                ints = self.ints
                assert ints is not None
                with self.writing(0) if self.layouts else contextlib.nullcontext():
                    ints[9] = max(ints[9], slot + 1)
                return slot
            os.close(self._files.pop(f"slot-{slot}.lock"))
        raise ZoneError(f"zone {self.name!r}: all {WORKER_SLOTS} worker slots are taken")

    def _zero_gauges(self) -> None:
        if self.ints is None or self.slot < 0:
            return
        for index in range(len(self.layouts)):
            for record in range(self.layouts[index].capacity):
                base = self.slot_word(self.record_word(index, record), self.slot)
                for gauge in _GAUGES:
                    self.ints[base + gauge] = 0

    def _map_file(self, fd: int) -> None:
        self._files["state"] = fd
        self._map = mmap.mmap(fd, self._size)
        self.ints = memoryview(self._map).cast("q")

    def _unmap(self) -> None:
        if self.ints is not None:
            self.ints.release()
        self.ints = None
        if self._map is not None:
            self._map.close()
            self._map = None

    def _close_files(self) -> None:
        self._unmap()
        for fd in self._files.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._files.clear()

    def _write_header(self) -> None:
        ints = self.ints
        assert ints is not None
        ints[0], ints[1] = _MAGIC, _VERSION
        ints[2:6] = memoryview(struct.pack("<4q", *self._fingerprint)).cast("q")
        ints[6], ints[7], ints[8], ints[9] = len(self.layouts), WORKER_SLOTS, self._record_words, 0
        record = 0
        for index, layout in enumerate(self.layouts):
            word = _HEADER_WORDS + _POOL_WORDS * index
            ints[word], ints[word + 1] = 0, layout.capacity
            ints[word + 2] = self._records_start + record * self._record_words
            for position, identity in enumerate(layout.identities):
                self._init_record(ints[word + 2] + position * self._record_words, identity)
            for position in range(len(layout.identities), layout.capacity):
                first = ints[word + 2] + position * self._record_words
                self.set_float(first + H_EJECTED_UNTIL, math.nan)
            record += layout.capacity

    def _init_record(self, word: int, identity: str) -> None:
        ints = self.ints
        assert ints is not None
        ints[word + H_USED] = 1
        ints[word + H_ID0], ints[word + H_ID1] = identity_hash(identity)
        ints[word + H_HEALTHY] = 1
        ints[word + H_LAST_OK] = -1
        ints[word + H_WEIGHT] = -1
        self.set_float(word + H_EJECTED_UNTIL, math.nan)
        self.set_float(word + H_RECOVERED_AT, math.nan)

    def _header_matches(self) -> bool:
        ints = self.ints
        assert ints is not None
        return (
            ints[0] == _MAGIC
            and ints[1] == _VERSION
            and tuple(ints[2:6]) == self._fingerprint
            and ints[7] == WORKER_SLOTS
            and ints[8] == self._record_words
        )


class ZonePool:
    """One pool's records in a zone: the shared health of each member, the generation
    that says it changed, and the per-worker counters. Members are bound to records by
    identity (``bind``); one with no record (a discovered pool's records all taken) keeps
    its state to this process."""

    def __init__(self, zone: Zone, index: int, layout: PoolLayout) -> None:
        self.zone = zone
        self.index = index
        self.layout = layout
        self._static = {identity: position for position, identity in enumerate(layout.identities)}

    @property
    def generation(self) -> int:
        return self.zone.generation(self.index)

    def writing(self) -> contextlib.AbstractContextManager[None]:
        return self.zone.writing(self.index)

    # -- members ------------------------------------------------------------------------------

    def bind(self, member: Member) -> None:
        """Give ``member`` its record (and its counters' base in this worker's slot), and
        load what the zone knows of it."""
        record = self.record(member.upstream.identity)
        if record is None:
            logger.warning(
                "zone %s: pool %s has no record left for %s (%d taken); its state stays "
                "with this worker",
                self.zone.name,
                self.layout.prefix,
                member.upstream.url,
                self.layout.capacity,
            )
            return
        member.record = record
        member.zone_base = self.base(record)
        self.load_member(member)

    def load_members(self, members: Sequence[Member]) -> int:
        """Load every member's shared state; returns the generation it was read at (a
        read that overlapped a write is done again)."""
        for _ in range(100):
            before = self.generation
            if before % 2:
                continue  # a write is under way: it takes microseconds
            for member in members:
                if member.record is not None:
                    self.load_member(member)
            if self.generation == before:
                return before
        with self.writing():  # a busy writer: read under the lock instead
            for member in members:
                if member.record is not None:
                    self.load_member(member)
            return self.generation + 1

    def load_member(self, member: Member) -> None:
        assert member.record is not None
        drained, weight = self.load(member.record, member.health)
        member.drained = drained
        member.weight_override = None if weight < 0 else weight

    def store_member(self, member: Member) -> None:
        assert member.record is not None
        self.store(member.record, member.health)

    @contextlib.contextmanager
    def writing_member(self, member: Member) -> Iterator[None]:
        """Under the write lock: ``member`` loaded fresh, changed by the block, stored."""
        with self.writing():
            self.load_member(member)
            yield
            self.store_member(member)

    def seed(self, members: Sequence[Member]) -> None:
        """Store what this process knows of ``members`` (health, drain, weight) as the
        shared state: a zone created by a reload starts from it."""
        with self.writing():
            for member in members:
                if member.record is not None:
                    self.store(member.record, member.health)
                    weight = member.weight_override
                    self.set_flag(member.record, member.drained, -1 if weight is None else weight)

    def set_drained(self, member: Member, drained: bool) -> None:
        if member.record is not None:
            with self.writing():
                self.set_flag(member.record, drained=drained)

    def set_weight(self, member: Member, weight: int | None) -> None:
        if member.record is not None:
            with self.writing():
                self.set_flag(member.record, weight=-1 if weight is None else weight)

    def count_check(self, member: Member, ok: bool, transition: bool) -> None:
        assert member.record is not None
        word = self.zone.record_word(self.index, member.record)
        ints = self.zone.ints
        assert ints is not None
        ints[word + (H_CHECKS_PASS if ok else H_CHECKS_FAIL)] += 1
        if transition:
            ints[word + H_CHECK_TRANSITIONS] += 1

    def flush(self, members: Sequence[Member]) -> None:
        """Write this worker's counters of ``members`` into its slot."""
        for member in members:
            if member.record is not None and member.zone_base is not None:
                self._flush(
                    member.record,
                    member.zone_base,
                    member.stats,
                    member.in_flight,
                    member.websockets,
                )

    def totals(self, members: Sequence[Member]) -> list[tuple[Member, UpstreamStats]]:
        """Each member's counters summed over every worker (gauges over live ones), this
        worker's flushed first. The stats' ``in_flight`` and ``websockets`` are set."""
        self.flush(members)
        slots = range(self.zone.used_slots())
        live = self.zone.live_slots()
        rows = []
        for member in members:
            if member.record is None:
                stats = member.stats
                stats.in_flight, stats.websockets = member.in_flight, member.websockets
            else:
                stats = self._totals(member.record, slots, live)
            rows.append((member, stats))
        return rows

    def record(self, identity: str) -> int | None:
        """The record of the member with this identity (a discovered one gets a free
        record, under the write lock); None if the pool's records are all taken."""
        position = self._static.get(identity)
        if position is not None or not self.layout.discovered:
            return position
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        wanted = identity_hash(identity)
        with self.writing():
            free = None
            for position in range(self.layout.capacity):
                word = zone.record_word(self.index, position)
                if not ints[word + H_USED]:
                    free = position if free is None else free
                elif (ints[word + H_ID0], ints[word + H_ID1]) == wanted:
                    return position
            if free is not None:
                zone._init_record(zone.record_word(self.index, free), identity)
            return free

    # -- shared health --------------------------------------------------------------------

    def load(self, record: int, health: UpstreamHealth) -> tuple[bool, int]:
        """Copy the shared health of ``record`` into ``health``; returns (drained, weight
        override or -1). Call under ``writing()``, or check the generation around it."""
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        word = zone.record_word(self.index, record)
        health.healthy = bool(ints[word + H_HEALTHY])
        health.check_passes = ints[word + H_CHECK_PASSES]
        health.check_fails = ints[word + H_CHECK_FAILS]
        health.fails = ints[word + H_FAILS]
        health.window_start = zone.float_at(word + H_WINDOW_START)
        health.ejected_until = _optional(zone.float_at(word + H_EJECTED_UNTIL))
        health.half_open = bool(ints[word + H_HALF_OPEN])
        health.probing = bool(ints[word + H_PROBING])
        health.probe_deadline = zone.float_at(word + H_PROBE_DEADLINE)
        health.recovered_at = _optional(zone.float_at(word + H_RECOVERED_AT))
        last_ok = ints[word + H_LAST_OK]
        if last_ok >= 0:
            length = ints[word + H_ERROR_LEN]
            error = bytes(ints[word + H_ERROR : word + H_ERROR + _ERROR_BYTES // 8])
            health.last_check = CheckResult(
                ok=bool(last_ok),
                status=ints[word + H_LAST_STATUS],
                error=error[:length].decode("utf-8", "replace") if length else None,
                at=zone.float_at(word + H_LAST_AT),
                latency=zone.float_at(word + H_LAST_LATENCY),
            )
        return bool(ints[word + H_DRAINED]), ints[word + H_WEIGHT]

    def store(self, record: int, health: UpstreamHealth) -> None:
        """Write ``health`` as the shared health of ``record`` (under ``writing()``)."""
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        word = zone.record_word(self.index, record)
        ints[word + H_HEALTHY] = int(health.healthy)
        ints[word + H_CHECK_PASSES] = health.check_passes
        ints[word + H_CHECK_FAILS] = health.check_fails
        ints[word + H_FAILS] = health.fails
        zone.set_float(word + H_WINDOW_START, health.window_start)
        zone.set_float(word + H_EJECTED_UNTIL, _nan_for_none(health.ejected_until))
        ints[word + H_HALF_OPEN] = int(health.half_open)
        ints[word + H_PROBING] = int(health.probing)
        zone.set_float(word + H_PROBE_DEADLINE, health.probe_deadline)
        zone.set_float(word + H_RECOVERED_AT, _nan_for_none(health.recovered_at))
        last = health.last_check
        if last is not None:
            ints[word + H_LAST_OK] = int(last.ok)
            ints[word + H_LAST_STATUS] = last.status
            zone.set_float(word + H_LAST_AT, last.at)
            zone.set_float(word + H_LAST_LATENCY, last.latency)
            error = (last.error or "").encode("utf-8")[:_ERROR_BYTES]
            padded = error.ljust(_ERROR_BYTES, b"\0")
            ints[word + H_ERROR : word + H_ERROR + _ERROR_BYTES // 8] = memoryview(padded).cast("q")
            ints[word + H_ERROR_LEN] = len(error)

    def set_flag(self, record: int, drained: bool | None = None, weight: int | None = None) -> None:
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        word = zone.record_word(self.index, record)
        if drained is not None:
            ints[word + H_DRAINED] = int(drained)
        if weight is not None:
            ints[word + H_WEIGHT] = weight

    # -- counters -----------------------------------------------------------------------------

    def base(self, record: int) -> list[int | float]:
        """This worker's slot of ``record`` as it is now: where a new member's counters
        start (a restarted worker carries on from the dead one's counts)."""
        zone = self.zone
        start = zone.slot_word(zone.record_word(self.index, record), zone.slot)
        ints = zone.ints
        assert ints is not None
        values: list[int | float] = list(ints[start : start + _COUNTER_WORDS])
        for hist in (C_HEADERS_HIST, C_TOTAL_HIST):
            values[hist + _HIST - 1] = zone.float_at(start + hist + _HIST - 1)
        for gauge in _GAUGES:
            values[gauge] = 0
        return values

    def _flush(
        self,
        record: int,
        base: list[int | float],
        stats: UpstreamStats,
        in_flight: int,
        websockets: int,
    ) -> None:
        """Write ``base`` + this worker's in-process counters into its slot."""
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        start = zone.slot_word(zone.record_word(self.index, record), zone.slot)
        values = _counter_words(stats, in_flight, websockets)
        for offset, value in enumerate(values):
            if offset in _FLOAT_OFFSETS:
                zone.set_float(start + offset, base[offset] + value)
            elif value or base[offset]:
                ints[start + offset] = int(base[offset]) + int(value)

    def _totals(self, record: int, slots: Sequence[int], live: Sequence[int]) -> UpstreamStats:
        """The counters of ``record`` summed over ``slots``, gauges over ``live`` ones, as
        an ``UpstreamStats`` (with ``in_flight`` and ``websockets`` set on it)."""
        zone = self.zone
        ints = zone.ints
        assert ints is not None
        word = zone.record_word(self.index, record)
        sums = [0] * _COUNTER_WORDS
        float_sums = {offset: 0.0 for offset in _FLOAT_OFFSETS}
        for slot in slots:
            start = zone.slot_word(word, slot)
            row = ints[start : start + _COUNTER_WORDS].tolist()
            for offset, value in enumerate(row):
                if value and offset not in _FLOAT_OFFSETS:
                    if offset in _GAUGES and slot not in live:
                        continue
                    sums[offset] += value
            for offset in _FLOAT_OFFSETS:
                float_sums[offset] += zone.float_at(start + offset)
        stats = _stats_from(sums, float_sums)
        stats.checks = {"pass": ints[word + H_CHECKS_PASS], "fail": ints[word + H_CHECKS_FAIL]}
        stats.transitions += ints[word + H_CHECK_TRANSITIONS]
        return stats


_FLOAT_OFFSETS = frozenset({C_HEADERS_HIST + _HIST - 1, C_TOTAL_HIST + _HIST - 1})


def _counter_words(stats: UpstreamStats, in_flight: int, websockets: int) -> list[int | float]:
    values: list[int | float] = [0] * _COUNTER_WORDS
    values[C_SUCCESSES] = stats.successes
    values[C_RETRIES] = stats.retries
    values[C_EJECTIONS] = stats.ejections
    values[C_TRANSITIONS] = stats.transitions
    values[C_BYTES_IN] = stats.bytes_in
    values[C_BYTES_OUT] = stats.bytes_out
    values[C_IN_FLIGHT] = in_flight
    values[C_WEBSOCKETS] = websockets
    for kind, count in stats.failures_by_kind.items():
        index = _KIND_INDEX.get(kind)
        if index is not None:
            values[C_KINDS + index] += count
        else:  # "5xx" and "status NNN" are counted by code
            pass
    for code, count in stats.status_failures.items():
        if 400 <= code <= 599:
            values[C_STATUS_FAILURES + code - 400] += count
    for code, count in stats.codes.items():
        if 100 <= code <= 599:
            values[C_CODES + code - 100] += count
    for hist, histogram in (
        (C_HEADERS_HIST, stats.headers_latency),
        (C_TOTAL_HIST, stats.total_latency),
    ):
        values[hist : hist + _HIST - 1] = histogram.counts
        values[hist + _HIST - 1] = histogram.total
    return values


def _stats_from(sums: list[int], float_sums: dict[int, float]) -> UpstreamStats:
    stats = UpstreamStats()
    stats.successes = sums[C_SUCCESSES]
    stats.retries = sums[C_RETRIES]
    stats.ejections = sums[C_EJECTIONS]
    stats.transitions = sums[C_TRANSITIONS]
    stats.bytes_in = sums[C_BYTES_IN]
    stats.bytes_out = sums[C_BYTES_OUT]
    stats.in_flight = sums[C_IN_FLIGHT]
    stats.websockets = sums[C_WEBSOCKETS]
    for index, kind in enumerate(KINDS):
        if sums[C_KINDS + index]:
            stats.failures_by_kind[kind] = sums[C_KINDS + index]
    for offset in range(_STATUS_FAILURES):
        count = sums[C_STATUS_FAILURES + offset]
        if count:
            code = 400 + offset
            stats.status_failures[code] = count
            kind = "5xx" if code >= 500 else f"status {code}"
            stats.failures_by_kind[kind] = stats.failures_by_kind.get(kind, 0) + count
    for offset in range(_CODES):
        if sums[C_CODES + offset]:
            stats.codes[100 + offset] = sums[C_CODES + offset]
    for hist, histogram in (
        (C_HEADERS_HIST, stats.headers_latency),
        (C_TOTAL_HIST, stats.total_latency),
    ):
        histogram.counts = sums[hist : hist + _HIST - 1]
        histogram.total = float_sums[hist + _HIST - 1]
    return stats


def layout_digest(layouts: Sequence[PoolLayout]) -> str:
    """A short name for what a zone holds, to name zones after their layout."""
    text = json.dumps([p.describe() for p in layouts], sort_keys=True)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _fingerprint(layouts: Sequence[PoolLayout]) -> tuple[int, int, int, int]:
    text = json.dumps(
        {"version": _VERSION, "slots": WORKER_SLOTS, "pools": [p.describe() for p in layouts]},
        sort_keys=True,
    )
    digest = hashlib.sha256(text.encode("utf-8")).digest()
    first, second, third, fourth = struct.unpack("<4q", digest)
    return first, second, third, fourth


def _try_flock(fd: int, operation: int) -> bool:
    try:
        fcntl.flock(fd, operation | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _optional(value: float) -> float | None:
    return None if math.isnan(value) else value


def _nan_for_none(value: float | None) -> float:
    return math.nan if value is None else value
