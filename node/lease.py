"""Who holds a claim: the identity a node process writes on the jobs and exports it claims.

An owner is ``<node name>/<pid>/<boot id>``: the node name is stable across restarts (``node.name``, default
from the host name, port and roles: :func:`node_name`), the pid and a random id made when the process starts
tell one run of it from the next. A process that starts under a name finds the claims of its earlier runs by
that name: they lost their holder, so it releases them at once instead of waiting for their leases to
expire. Claims of other names are left alone until their lease expires (their holder stopped renewing it).
"""
from __future__ import annotations

import os
import socket
import uuid
from dataclasses import dataclass

from node.config import ROLES, Settings

SEPARATOR = "/"


@dataclass(frozen=True)
class Owner:
    node: str   # the stable node name
    pid: int
    boot: str   # random, made once per process start

    def __str__(self) -> str:
        return SEPARATOR.join((self.node, str(self.pid), self.boot))

    @classmethod
    def parse(cls, text: str) -> Owner:
        node, pid, boot = text.rsplit(SEPARATOR, 2)
        return cls(node, int(pid), boot)

    def is_earlier_run_of_this_node(self, other: str | None) -> bool:
        """Whether the claim ``other`` was written by an earlier run of this node (same name, another run)."""
        if not other:
            return False
        try:
            held = Owner.parse(other)
        except ValueError:
            return False
        return held.node == self.node and held != self


def node_name(settings: Settings) -> str:
    """``node.name``, else ``<host name>:<port>``, followed by ``-<roles>`` for a process that does not run
    all of them (so that a worker and an exporter started from one configuration file differ)."""
    if settings.node.name:
        return settings.node.name
    roles = "" if set(settings.node.roles) == set(ROLES) else "-" + "+".join(sorted(settings.node.roles))
    return f"{socket.gethostname()}:{settings.node.port}{roles}"


def this_process(settings: Settings) -> Owner:
    """A new owner identity for the running process."""
    name = node_name(settings).replace(SEPARATOR, "_")
    return Owner(name, os.getpid(), uuid.uuid4().hex[:12])
