"""`levante keys`, `levante usage` and `levante cost`: managing who may spend what, seeing what was
spent, and estimating what a team would spend."""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from levante.errors import LevanteError
from levante.metering.ledger import GROUPS, Key, Ledger, parse_day
from levante.metering.prices import Prices, add_price_flags, prices_from_args, team_cost

DB_ENV = "LEVANTE_USAGE_DB"


def add_db_flag(p: argparse.ArgumentParser, required_for: str) -> None:
    p.add_argument(
        "--usage-db",
        type=Path,
        default=os.environ.get(DB_ENV) or None,
        help=f"the SQLite usage ledger (default: ${DB_ENV}); {required_for}",
    )


def open_ledger(args: argparse.Namespace) -> Ledger:
    if args.usage_db is None:
        raise LevanteError(f"no usage ledger: pass --usage-db PATH or set {DB_ENV}")
    return Ledger(args.usage_db)


def budget(text: str) -> float | None:
    """A budget in USD, or `none` to remove it."""
    if text.lower() == "none":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected USD or 'none', got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def table(rows: list[dict[str, Any]]) -> str:
    """Aligned plain-text columns (numbers right-aligned)."""
    if not rows:
        return "(nothing)"
    cols = list(rows[0])
    cells = [[_cell(r[c]) for c in cols] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(r[c], int | float) for r in rows) for c in cols]

    def line(values: list[str]) -> str:
        parts = [v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=True)]
        return "  ".join(parts).rstrip()

    return "\n".join([line(cols), *(line(row) for row in cells)])


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.6f}" if abs(value) < 1 else f"{value:,.2f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _when(stamp: float | None) -> str | None:
    return None if stamp is None else datetime.fromtimestamp(stamp, UTC).strftime("%Y-%m-%d %H:%M")


def key_row(ledger: Ledger, key: Key) -> dict[str, Any]:
    spent, team_spent = ledger.spent(key)
    return {
        "id": key.id,
        "team": key.team,
        "name": key.name,
        "key": key.hint + "…",
        "admin": "yes" if key.admin else "",
        "budget": key.monthly_budget,
        "spent": spent,
        "team_budget": ledger.team_budget(key.team or ""),
        "team_spent": team_spent,
        "created": _when(key.created),
        "revoked": _when(key.revoked),
    }


def cmd_keys(args: argparse.Namespace) -> None:
    ledger = open_ledger(args)
    try:
        if args.action == "create":
            key, secret = ledger.create_key(args.team, args.name, args.monthly_budget, args.admin)
            note = f"created key {key.id} ({key.name!r}, team {key.team!r}); it is shown only now:"
            print(note, file=sys.stderr)
            print(secret)
        elif args.action == "list":
            print(table([key_row(ledger, k) for k in ledger.list_keys(args.team)]))
        elif args.action == "revoke":
            key = ledger.revoke(args.id)
            print(f"revoked key {key.id} ({key.name!r}, team {key.team!r})")
        elif args.key is not None:  # set-budget
            ledger.set_key_budget(args.key, args.usd)
            print(f"key {args.key}: monthly budget {_budget_text(args.usd)}")
        else:
            ledger.set_team_budget(args.team, args.usd)
            print(f"team {args.team!r}: monthly budget {_budget_text(args.usd)}")
    finally:
        ledger.close()


def _budget_text(usd: float | None) -> str:
    return "none" if usd is None else f"${usd:,.2f}"


def cmd_usage(args: argparse.Namespace) -> None:
    ledger = open_ledger(args)
    try:
        since = parse_day(args.since, "--since") if args.since else None
        rows = ledger.report(args.team, since, tuple(g for g in args.group.split(",") if g))
    finally:
        ledger.close()
    if args.format == "json":
        print(json.dumps(rows, indent=2))
    elif args.format == "csv":
        if rows:
            writer = csv.DictWriter(sys.stdout, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
    else:
        print(table(rows))


def compare_pair(text: str) -> tuple[str, Prices]:
    """`NAME=IN/OUT`, USD per million input / output tokens."""
    name, _, pair = text.partition("=")
    price_in, _, price_out = pair.partition("/")
    try:
        if not name:
            raise ValueError
        return name, Prices(float(price_in), float(price_out))
    except (ValueError, LevanteError):
        raise argparse.ArgumentTypeError(f"expected NAME=IN/OUT like gpt-4o=2.5/10, got {text!r}") from None


def monthly_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Tokens a team sends and receives in `days`, priced at ours and each compared price pair."""
    usage = (args.seats, args.messages_per_day, args.input_tokens, args.output_tokens, args.days)
    return [
        {
            "prices": name,
            "input_per_M": prices.input,
            "output_per_M": prices.output,
            **team_cost(prices, *usage),
        }
        for name, prices in [("levante", prices_from_args(args)), *args.compare]
    ]


def cmd_cost(args: argparse.Namespace) -> None:
    rows = monthly_cost(args)
    print(f"{args.seats} seats × {args.messages_per_day} messages/day × {args.days} days")
    money = ("input_per_M", "output_per_M", "cost")
    print(table([{k: f"${v:,.2f}" if k in money else v for k, v in r.items()} for r in rows]))


def register(sub: argparse._SubParsersAction) -> None:
    from levante.cli import positive

    k = sub.add_parser("keys", help="API keys and team budgets in the usage ledger")
    k.set_defaults(func=cmd_keys)
    actions = k.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new key (printed once)")
    create.add_argument("--team", required=True)
    create.add_argument("--name", required=True)
    create.add_argument("--monthly-budget", type=budget, help="this key's own monthly cap, USD")
    create.add_argument("--admin", action="store_true", help="may read GET /v1/usage")
    listing = actions.add_parser("list", help="keys with this month's spend")
    listing.add_argument("--team")
    revoke = actions.add_parser("revoke", help="a revoked key gets 401 from then on")
    revoke.add_argument("id", type=int)
    setb = actions.add_parser("set-budget", help="a key's or a team's monthly budget (USD or 'none')")
    which = setb.add_mutually_exclusive_group(required=True)
    which.add_argument("--key", type=int, help="key id")
    which.add_argument("--team")
    setb.add_argument("usd", type=budget)
    for p in (create, listing, revoke, setb):
        add_db_flag(p, "required")

    u = sub.add_parser("usage", help="tokens, cost, latency and throughput from the ledger")
    u.set_defaults(func=cmd_usage)
    add_db_flag(u, "required")
    u.add_argument("--team")
    u.add_argument("--since", help="first day, e.g. 2026-11-01 (UTC)")
    u.add_argument("--group", default=",".join(GROUPS), help=f"comma-separated, any of {','.join(GROUPS)}")
    u.add_argument("--format", choices=["table", "csv", "json"], default="table")

    c = sub.add_parser("cost", help="what a team's usage would cost per month")
    c.set_defaults(func=cmd_cost)
    c.add_argument("--seats", type=positive(int), required=True)
    c.add_argument("--messages-per-day", type=positive(int), required=True, help="per seat")
    c.add_argument("--input-tokens", type=positive(int), required=True, help="per message")
    c.add_argument("--output-tokens", type=positive(int), required=True, help="per message")
    c.add_argument("--days", type=positive(int), default=30)
    c.add_argument(
        "--compare", type=compare_pair, action="append", default=[], help="NAME=IN/OUT, USD per M (repeat)"
    )
    add_price_flags(c)
