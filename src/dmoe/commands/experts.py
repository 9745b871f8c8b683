"""``dmoe experts list|show|rm`` and ``dmoe bank check``: inspect and edit a bank."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

DEFAULT_BANK_ENV = "DMOE_BANK"


def _bank_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--bank", default=os.environ.get(DEFAULT_BANK_ENV),
                   help=f"bank directory (default: ${DEFAULT_BANK_ENV})")


def register(sub: argparse._SubParsersAction) -> None:
    fmt = argparse.RawDescriptionHelpFormatter
    e = sub.add_parser("experts", help="list, show or remove experts of a bank",
                       description="Inspect and edit a bank's experts.\n\nexamples:\n"
                                   "  dmoe experts list --bank runs/demo-bank --json\n"
                                   "  dmoe experts show velmora#0 --bank runs/demo-bank\n"
                                   "  dmoe experts rm velmora#0 --bank runs/demo-bank",
                       formatter_class=fmt)
    esub = e.add_subparsers(dest="experts_command", metavar="SUBCOMMAND")
    ls = esub.add_parser("list", help="one line per expert (or --json)")
    show = esub.add_parser("show", help="one expert's metadata and routing text")
    show.add_argument("expert_id")
    rm = esub.add_parser("rm", help="delete experts (from the index, then the bank)")
    rm.add_argument("expert_ids", nargs="+")
    for p in (ls, show, rm):
        _bank_arg(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_list)
    show.set_defaults(func=run_show)
    rm.set_defaults(func=run_rm)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])

    b = sub.add_parser("bank", help="bank maintenance (check / repair drift)",
                       description="Bank maintenance.\n\nexample:\n"
                                   "  dmoe bank check --bank runs/demo-bank --repair",
                       formatter_class=fmt)
    bsub = b.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    check = bsub.add_parser("check", help="report (and with --repair fix) file/row/index drift")
    _bank_arg(check)
    check.add_argument("--repair", action="store_true", help="fix what is found")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=run_check)
    b.set_defaults(func=lambda args: (b.print_help(), 2)[1])


def _open(args: argparse.Namespace, sync: bool = True) -> Any:
    from dmoe.knowledge import KnowledgeBase

    if not args.bank:
        raise ValueError(f"no bank given: pass --bank DIR or set ${DEFAULT_BANK_ENV}")
    return KnowledgeBase.open(args.bank, sync=sync)


def run_list(args: argparse.Namespace) -> int:
    kb = _open(args)
    rows = [{"id": i.id, "unit_id": i.unit_id, "title": i.title, "dtype": i.dtype,
             "bytes": i.bytes, "updated": i.updated} for i in kb.list()]
    if args.json:
        print(json.dumps(rows))
    else:
        for r in rows:
            print(f"{r['id']:<32} {r['title'][:40]:<40} {r['bytes']:>8} B  {r['updated']}")
        print(f"{len(rows)} experts")
    kb.close()
    return 0


def run_show(args: argparse.Namespace) -> int:
    kb = _open(args)
    info = kb.info(args.expert_id)
    d = {**info.__dict__, "surrogate": kb.surrogate(args.expert_id),
         "spec": kb.bank.spec.__dict__, "base_fingerprint": kb.bank.fingerprint}
    print(json.dumps(d, indent=None if args.json else 2))
    kb.close()
    return 0


def run_rm(args: argparse.Namespace) -> int:
    kb = _open(args)
    for expert_id in args.expert_ids:
        kb.delete(expert_id)
        if not args.json:
            print(f"deleted {expert_id}")
    if args.json:
        print(json.dumps({"deleted": args.expert_ids}))
    kb.close()
    return 0


def run_check(args: argparse.Namespace) -> int:
    kb = _open(args, sync=False)
    report = kb.check(repair=args.repair)
    d = report.to_dict()
    print(json.dumps(d, indent=None if args.json else 2))
    kb.close()
    return 0 if report.ok or args.repair else 1
