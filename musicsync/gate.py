"""A room's door: its password hash, invites, bans, and what its listeners may do (sans-IO).

The hashing itself is access.py's (scrypt for passwords, SHA-256 for tokens),
done by the edge; the gate keeps only hashes.

Invariants (tests/test_gate.py, tests/test_room_properties.py):

* An invite admits its holder (past any password) until ``expires_at``, and
  grants its role (listener or co-host, never host); at most MAX_INVITES live
  invites, expired ones are dropped when a new one is made.
* A ban keeps a token hash out until its ``until``; bans are kept in the order
  they fall due (a re-ban moves to the end), so ``expire`` stops at the first
  one not due.
* ``protected`` is True exactly when a password hash is set.
* ``revision`` grows with every change ``to_dict`` covers.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .effects import Refusal
from .timeline import MS_PER_SECOND

MAX_INVITES = 100
# A kicked participant's token cannot rejoin for this long.
KICK_BAN_MS = 10 * 60_000.0
INVITE_CODE_BYTES = 16
INVITE_ROLES = ("listener", "cohost")


def new_invite_code() -> str:
    return secrets.token_urlsafe(INVITE_CODE_BYTES)


@dataclass(frozen=True, slots=True)
class Invite:
    code: str
    role: str
    expires_at: float


@dataclass(slots=True)
class RoomSettings:
    listeners_may_upload: bool = False


class Gate:
    """The access part of a room."""

    __slots__ = ("_banned", "_new_code", "invites", "password_hash", "revision", "settings")

    def __init__(self, new_code: Callable[[], str] = new_invite_code) -> None:
        self.password_hash: str | None = None  # set by the edge, which does the hashing
        self.invites: dict[str, Invite] = {}
        self.settings = RoomSettings()
        self.revision = 0
        self._banned: dict[str, float] = {}  # token hash -> until, in due order
        self._new_code = new_code

    # -- queries -------------------------------------------------------------------

    @property
    def protected(self) -> bool:
        return self.password_hash is not None

    def valid_invite(self, code: str, now: float) -> Invite | None:
        invite = self.invites.get(code)
        return invite if invite is not None and now < invite.expires_at else None

    def admission(
        self, now: float, invite: str | None, holds_seat: Callable[[], bool]
    ) -> tuple[bool, str | None]:
        """(may enter without a password, role an invite grants) for a new connection;
        ``holds_seat`` says whether its token holds a seat (asked only when it matters)."""
        granted = self.valid_invite(invite, now) if invite else None
        role = granted.role if granted else None
        if self.password_hash is None or granted is not None:
            return True, role
        return holds_seat(), role

    def is_banned(self, token_hash: str, now: float) -> bool:
        until = self._banned.get(token_hash)
        return until is not None and now < until

    def settings_wire(self) -> dict[str, Any]:
        return {
            "listeners_may_upload": self.settings.listeners_may_upload,
            "protected": self.protected,
        }

    # -- transitions ------------------------------------------------------------------

    def set_password_hash(self, password_hash: str | None) -> bool:
        self.password_hash = password_hash
        self.revision += 1
        return True

    def set_listeners_may_upload(self, allowed: bool | None) -> bool:
        if allowed is None:
            return False
        self.settings = RoomSettings(listeners_may_upload=allowed)
        self.revision += 1
        return True

    def create_invite(self, role: str, expires_in_s: float, now: float) -> Invite:
        if role not in INVITE_ROLES:
            raise ValueError(f"an invite grants one of {INVITE_ROLES}, not {role!r}")
        for code, invite in list(self.invites.items()):
            if now >= invite.expires_at:
                self.revision += 1
                del self.invites[code]
        if len(self.invites) >= MAX_INVITES:
            raise Refusal("too_many_invites", f"at most {MAX_INVITES} live invites")
        invite = Invite(self._new_code(), role, now + expires_in_s * MS_PER_SECOND)
        self.invites[invite.code] = invite
        self.revision += 1
        return invite

    def revoke_invite(self, code: str) -> None:
        if self.invites.pop(code, None) is None:
            raise Refusal("no_such_invite", "no live invite with that code")
        self.revision += 1

    def ban(self, token_hash: str, until: float) -> None:
        self.revision += 1
        self._banned.pop(token_hash, None)  # re-banned: moves to the end
        self._banned[token_hash] = until

    def expire(self, now: float) -> None:
        """Lift the bans that fell due."""
        while self._banned:
            token_hash, until = next(iter(self._banned.items()))
            if now < until:
                break
            self.revision += 1
            del self._banned[token_hash]

    # -- the database ----------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        return {
            "password_hash": self.password_hash,
            "invites": {
                code: {"role": inv.role, "expires_at": inv.expires_at}
                for code, inv in self.invites.items()
            },
            "banned_hashes": dict(self._banned),  # a copy: the writer thread encodes it
            "listeners_may_upload": self.settings.listeners_may_upload,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], new_code: Callable[[], str] = new_invite_code) -> Gate:
        gate = cls(new_code)
        gate.password_hash = d.get("password_hash")
        gate.invites = {
            code: Invite(code, inv["role"], float(inv["expires_at"]))
            for code, inv in d.get("invites", {}).items()
        }
        banned = ((str(k), float(v)) for k, v in d.get("banned_hashes", {}).items())
        gate._banned = dict(sorted(banned, key=lambda item: item[1]))  # due order
        gate.settings = RoomSettings(listeners_may_upload=bool(d.get("listeners_may_upload")))
        return gate
