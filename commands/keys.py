"""``jennah keys …``: issue, list and revoke API keys, map proxy identities to tenants.

Every change goes through :func:`gateway.keyfile.editing` (an exclusive lock, then an
atomic rewrite), so concurrent commands never lose one another's change; a running
gateway picks the change up within about a second (``gateway/keys.py``).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from gateway.keyfile import KeyFileError, editing, new_key, read_key_file, revoked
from jennah.errors import InvalidArgument, SettingsError
from jennah.models import validate_tenant


def _file_of(args: argparse.Namespace) -> Path:
    raw = args.file or os.environ.get("JENNAH_API_KEYS_FILE", "").strip()
    if not raw:
        raise SettingsError("no key file: pass --file or set JENNAH_API_KEYS_FILE")
    return Path(raw).expanduser()


def _create(args: argparse.Namespace) -> int:
    path = _file_of(args)
    with editing(path) as contents:
        entry, plain = new_key(args.tenant, args.label,
                               frozenset(k.id for k in contents.keys))
        contents.keys.append(entry)
    print(f"created key {entry.id} for tenant {entry.tenant} in {path}", file=sys.stderr)
    print("this is the only time the key is shown; store it now:", file=sys.stderr)
    print(plain)
    return 0


def _list(args: argparse.Namespace) -> int:
    path = _file_of(args)
    contents = read_key_file(path)
    rows = [(k.id, k.tenant, k.label or "-", k.created_at or "-", k.revoked_at or "-")
            for k in contents.keys]
    header = ("ID", "TENANT", "LABEL", "CREATED", "REVOKED")
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(4)]
    for row in [header, *rows]:
        print("  ".join(c.ljust(w) for c, w in zip(row[:4], widths, strict=True)) + "  " + row[4])
    if contents.identities:
        print()
        print("IDENTITY -> TENANT")
        for email, tenant in sorted(contents.identities.items()):
            print(f"{email} -> {tenant}")
    return 0


def _revoke(args: argparse.Namespace) -> int:
    path = _file_of(args)
    with editing(path) as contents:
        for i, entry in enumerate(contents.keys):
            if entry.id == args.id:
                if entry.revoked:
                    print(f"key {entry.id} was already revoked at {entry.revoked_at}")
                else:
                    contents.keys[i] = revoked(entry)
                    print(f"revoked key {entry.id} (tenant {entry.tenant})")
                return 0
    print(f"jennah: no key with id {args.id!r} in {path}", file=sys.stderr)
    return 1


def _map(args: argparse.Namespace) -> int:
    email = args.email.strip().lower()
    if "@" not in email:
        raise SettingsError(f"{args.email!r} is not an email address")
    tenant = validate_tenant(args.tenant)
    with editing(_file_of(args)) as contents:
        contents.identities[email] = tenant
    print(f"{email} -> {tenant}")
    return 0


def _unmap(args: argparse.Namespace) -> int:
    email = args.email.strip().lower()
    with editing(_file_of(args)) as contents:
        found = contents.identities.pop(email, None) is not None
    if not found:
        print(f"jennah: {email} was not mapped", file=sys.stderr)
        return 1
    print(f"removed {email}")
    return 0


def _guard(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except (KeyFileError, InvalidArgument) as exc:
            print(f"jennah: {exc}", file=sys.stderr)
            return 2

    return run


def add_keys_commands(subparsers: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Register ``keys create|list|revoke|map|unmap`` on the ``jennah`` parser."""
    keys = subparsers.add_parser("keys", help="manage API keys and proxy identities",
                                 description=__doc__.split("\n\n")[0] if __doc__ else None)
    sub = keys.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str
            ) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = sub.add_parser(name, help=help_)
        p.add_argument("--file", "-f", default="",
                       help="key file (default: $JENNAH_API_KEYS_FILE)")
        p.set_defaults(fn=_guard(fn))
        return p

    p = add("create", _create, "issue a key for a tenant (printed once, stored hashed)")
    p.add_argument("--tenant", "-t", required=True)
    p.add_argument("--label", "-l", default="", help="a note, e.g. who holds the key")
    add("list", _list, "list keys (id, tenant, label, created, revoked) and identities")
    add("revoke", _revoke, "revoke a key by id (the gateway notices within ~1 s)").add_argument(
        "id")
    p = add("map", _map, "map a proxy identity (email) to a tenant")
    p.add_argument("email")
    p.add_argument("--tenant", "-t", required=True)
    add("unmap", _unmap, "remove a proxy identity").add_argument("email")
