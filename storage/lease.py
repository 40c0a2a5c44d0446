"""The training lease: one trainer per version chain.

Two servers on one store would otherwise interleave two unrelated training runs into one chain.
The lease is one small document, `lease/training.json`, written only by compare-and-swap:

    {"holder": "<host:pid:random>", "epoch": 7, "expires_at": "2026-12-03T07:30:00.000000Z"}

- `acquire()` takes a free or expired lease (epoch + 1: a new term) or renews its own (same
  epoch); a lease held by another, unexpired, is refused (None).
- `renew()` extends the holder's term; it fails (LeaseLost) when someone else has taken the lease
  meanwhile, i.e. after this holder failed to renew within the TTL.
- `check()` is the fence before each commit: it raises LeaseLost unless the stored lease is
  still this holder's term. The term's epoch goes into every commit's training metrics
  (`lease_epoch`), so the chain itself shows its lineage: epochs never decrease along it.

The expiry uses the store clients' wall clocks, so the TTL must be well above their skew.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from storage.chain import Clock, VersionChain, utc_now
from storage.documents import canonical_bytes
from storage.objectstore import Conflict, NotFound

log = logging.getLogger(__name__)

LEASE_KEY = "lease/training.json"
_TIME_FORMAT = "%Y-%m-%dT%H:%M:%S.%fZ"


class LeaseLost(RuntimeError):
    """The lease is (now) another holder's: stop training and committing."""


@dataclass(frozen=True)
class LeaseState:
    holder: str
    epoch: int
    expires_at: datetime

    def to_bytes(self) -> bytes:
        return canonical_bytes({"holder": self.holder, "epoch": self.epoch,
                                "expires_at": self.expires_at.strftime(_TIME_FORMAT)})

    @staticmethod
    def from_bytes(data: bytes) -> LeaseState:
        doc = json.loads(data)
        expires = datetime.strptime(doc["expires_at"], _TIME_FORMAT).replace(
            tzinfo=utc_now().tzinfo)
        return LeaseState(str(doc["holder"]), int(doc["epoch"]), expires)


def default_holder() -> str:
    """host:pid:random, unique per server process."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


class TrainingLease:
    def __init__(
        self,
        chain: VersionChain,
        *,
        ttl_s: float,
        holder: str | None = None,
        clock: Clock | None = None,
    ) -> None:
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be > 0, got {ttl_s!r}")
        self.chain = chain
        self.ttl = timedelta(seconds=ttl_s)
        self.holder = holder or default_holder()
        self.clock = clock or chain.clock
        self.epoch: int | None = None  # this holder's current term, None when not held
        self._etag: str | None = None

    async def read(self) -> tuple[LeaseState | None, str | None]:
        """The stored lease and its etag (None, None when there is none)."""
        obj = await self.chain._get_or_none(LEASE_KEY)
        if obj is None:
            return None, None
        return LeaseState.from_bytes(obj.data), obj.etag

    async def acquire(self) -> int | None:
        """Take or renew the lease: its epoch, or None while another holder's term runs."""
        state, etag = await self.read()
        now = self.clock()
        if state is not None and state.holder != self.holder and state.expires_at > now:
            self.epoch, self._etag = None, None
            return None
        if state is None:
            epoch = 1
        elif state.holder == self.holder and state.epoch == self.epoch:
            epoch = state.epoch  # still ours: a renewal
        else:
            epoch = state.epoch + 1  # a new term, after an expiry (ours or another's)
        new = LeaseState(self.holder, epoch, now + self.ttl)
        try:
            if etag is None:
                self._etag = await self.chain._put_if_absent(LEASE_KEY, new.to_bytes())
            else:
                self._etag = await self.chain._put_if_match(LEASE_KEY, new.to_bytes(), etag)
        except (Conflict, NotFound):
            self.epoch, self._etag = None, None
            return None  # another server won the race for it
        if epoch != self.epoch:
            log.info("training lease taken: epoch %d by %s", epoch, self.holder)
        self.epoch = epoch
        return epoch

    async def renew(self) -> int:
        """Extend this holder's term; LeaseLost when the lease is no longer ours."""
        if self.epoch is None or self._etag is None:
            raise LeaseLost("the training lease is not held")
        new = LeaseState(self.holder, self.epoch, self.clock() + self.ttl)
        try:
            self._etag = await self.chain._put_if_match(LEASE_KEY, new.to_bytes(), self._etag)
        except (Conflict, NotFound):
            state, _ = await self.read()
            lost_to = "nobody" if state is None else f"{state.holder} (epoch {state.epoch})"
            epoch, self.epoch, self._etag = self.epoch, None, None
            raise LeaseLost(f"training lease epoch {epoch} was taken over by {lost_to}") from None
        return self.epoch

    async def check(self) -> int:
        """The fence before a commit: this holder's epoch, or LeaseLost."""
        state, _ = await self.read()
        if (self.epoch is None or state is None or state.holder != self.holder
                or state.epoch != self.epoch):
            held = "nobody" if state is None else f"{state.holder} (epoch {state.epoch})"
            raise LeaseLost(f"not the training leaseholder (held by {held})")
        return self.epoch

    async def release(self) -> None:
        """Let the next server take over at once (expire our term); best effort."""
        if self.epoch is None or self._etag is None:
            return
        gone = LeaseState(self.holder, self.epoch, self.clock() - timedelta(seconds=1))
        try:
            await self.chain._put_if_match(LEASE_KEY, gone.to_bytes(), self._etag)
        except Exception as exc:  # it expires by itself within the TTL
            log.warning("could not release the training lease: %s", exc)
        self.epoch, self._etag = None, None
