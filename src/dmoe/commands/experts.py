"""``dmoe experts list|show|rm`` and ``dmoe bank check|migrate|convert|merge``: inspect and edit a
bank."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
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
    rm = esub.add_parser("rm", help="delete experts, or with --document whole documents "
                                    "(from the index, then the bank)")
    rm.add_argument("expert_ids", nargs="+", metavar="ID")
    rm.add_argument("--document", action="store_true",
                    help="the ids are document ids: remove every passage of each")
    for p in (ls, show, rm):
        _bank_arg(p)
        p.add_argument("--json", action="store_true", help="machine-readable output")
    ls.set_defaults(func=run_list)
    show.set_defaults(func=run_show)
    rm.set_defaults(func=run_rm)
    e.set_defaults(func=lambda args: (e.print_help(), 2)[1])

    b = sub.add_parser("bank", help="bank maintenance (check / repair / migrate / convert / merge)",
                       description="Bank maintenance.\n\nexamples:\n"
                                   "  dmoe bank check --bank runs/demo-bank --deep\n"
                                   "  dmoe bank check --bank runs/demo-bank --repair\n"
                                   "  dmoe bank migrate --bank runs/old-bank\n"
                                   "  dmoe bank convert --bank runs/demo-bank --to runs/q8 "
                                   "--dtype int8\n"
                                   "  dmoe bank merge runs/shard-0 runs/shard-1 --to runs/all",
                       formatter_class=fmt)
    bsub = b.add_subparsers(dest="bank_command", metavar="SUBCOMMAND")
    check = bsub.add_parser(
        "check", help="verify the database, every expert file (size, header, checksum) and the "
                      "index; exit 1 if anything is wrong",
        description="Without --repair nothing is written. --repair takes the bank lock, rebuilds a "
                    "missing or unreadable database from the expert files, moves orphan, "
                    "temporary and corrupt files to BANK/quarantine/ (never deletes them), drops "
                    "rows without a usable file (the next build retrains them) and rebuilds a "
                    "broken index.")
    _bank_arg(check)
    check.add_argument("--deep", action="store_true",
                       help="also load every expert: refuse non-finite weights and wrong shapes")
    check.add_argument("--repair", action="store_true", help="fix what is found (see above)")
    check.add_argument("--json", action="store_true")
    check.set_defaults(func=run_check)
    mig = bsub.add_parser("migrate", help="upgrade a bank written by an older dmoe, in place")
    _bank_arg(mig)
    mig.set_defaults(func=run_migrate)
    from dmoe.experts.format import STORAGE_DTYPES

    conv = bsub.add_parser(
        "convert", help="copy a bank with its experts stored in another dtype (e.g. int8)",
        description="Copy --bank into a new bank --to whose expert files are stored in --dtype "
                    "(int8: absmax per rank channel, about a quarter of fp32's tensor bytes). "
                    "Ids, documents and routing texts are kept; the source is only read; the new "
                    "bank gets its own router index. Rerun to resume.")
    _bank_arg(conv)
    conv.add_argument("--to", required=True, type=Path, metavar="DIR", help="the new bank")
    conv.add_argument("--dtype", required=True, choices=STORAGE_DTYPES)
    conv.set_defaults(func=run_convert)
    merge = bsub.add_parser(
        "merge", help="copy the experts of several banks into one (e.g. banks built in shards)",
        description="Copy every expert of the source banks into --to (created if missing), with "
                    "its id, document, routing text and record. All must be built for one base "
                    "model with one expert shape. An expert --to already holds with the same text "
                    "and training settings is skipped (a passage two sources share is stored "
                    "once); the same id trained differently is an error. The sources are only "
                    "read; rerun to resume.")
    merge.add_argument("sources", nargs="+", type=Path, metavar="BANK", help="source banks")
    merge.add_argument("--to", required=True, type=Path, metavar="DIR", help="the merged bank")
    merge.add_argument("--dtype", choices=STORAGE_DTYPES, default=None,
                       help="storage dtype of a new --to (default: the first source's)")
    merge.set_defaults(func=run_merge)
    b.set_defaults(func=lambda args: (b.print_help(), 2)[1])


def _need_bank(args: argparse.Namespace) -> str:
    if not args.bank:
        raise ValueError(f"no bank given: pass --bank DIR or set ${DEFAULT_BANK_ENV}")
    return str(args.bank)


def _open(args: argparse.Namespace, readonly: bool) -> Any:
    """The knowledge base to edit, or (``readonly``) just the bank: listing needs no index."""
    from dmoe.experts.bank import ExpertBank
    from dmoe.knowledge import KnowledgeBase

    if readonly:
        return _ReadOnly(ExpertBank.open(_need_bank(args), readonly=True))
    return KnowledgeBase.open(_need_bank(args))


class _ReadOnly:
    """The bank behind ``list``/``show``, with the knowledge base's read methods."""

    def __init__(self, bank: Any) -> None:
        self.bank = bank

    def list(self) -> Any:
        return self.bank.list()

    def info(self, expert_id: str) -> Any:
        from dmoe.errors import BankError

        try:
            return self.bank.info(expert_id)
        except KeyError:
            raise BankError(f"no expert {expert_id!r} in the bank") from None

    def surrogate(self, expert_id: str) -> str:
        self.info(expert_id)
        return str(self.bank.surrogate(expert_id))

    def close(self) -> None:
        self.bank.close()


def run_list(args: argparse.Namespace) -> int:
    kb = _open(args, readonly=True)
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
    kb = _open(args, readonly=True)
    info = kb.info(args.expert_id)
    d = {**info.__dict__, "surrogate": kb.surrogate(args.expert_id),
         "spec": kb.bank.spec.__dict__, "base_fingerprint": kb.bank.fingerprint}
    print(json.dumps(d, indent=None if args.json else 2))
    kb.close()
    return 0


def run_rm(args: argparse.Namespace) -> int:
    kb = _open(args, readonly=False)
    deleted: list[str] = []
    try:
        for given in args.expert_ids:
            if args.document:
                ids = kb.delete_document(given).removed
            else:
                kb.delete(given)
                ids = [given]
            deleted.extend(ids)
            if not args.json:
                print(f"deleted {', '.join(ids)}")
    finally:
        kb.close()
    if args.json:
        print(json.dumps({"deleted": deleted}))
    return 0


def run_check(args: argparse.Namespace) -> int:
    from dmoe.knowledge import check_knowledge

    report = check_knowledge(_need_bank(args), deep=args.deep, repair=args.repair)
    d = report.to_dict()
    print(json.dumps(d, indent=None if args.json else 2))
    if not args.json:
        bank = report.bank
        verdict = "ok" if report.ok else "PROBLEMS FOUND"
        print(f"{verdict}: database {bank.database}, {bank.experts} experts checked"
              f"{' deeply' if args.deep else ''}, {len(bank.corrupt)} corrupt, "
              f"{len(bank.missing_files)} missing, {len(bank.orphan_files)} orphan files, "
              f"index {report.index_error or ('in sync' if report.index and report.index.in_sync else 'drifted')}"
              + (f"; quarantined {len(bank.quarantined)}, rebuilt {bank.rebuilt} rows, removed "
                 f"{len(bank.removed_rows)} rows (rebuild to retrain them)" if args.repair else ""),
              file=sys.stderr)
    return 0 if report.ok or args.repair else 1


def run_convert(args: argparse.Namespace) -> int:
    return _copy_into(args.to, [Path(_need_bank(args))], args.dtype, f"convert to {args.dtype}")


def run_merge(args: argparse.Namespace) -> int:
    return _copy_into(args.to, args.sources, args.dtype, "merge")


def _copy_into(dst: Path, sources: list[Path], dtype: str | None, desc: str) -> int:
    from tqdm import tqdm

    from dmoe.experts.bank import ExpertBank, merge_banks
    from dmoe.knowledge import KnowledgeBase

    total = 0
    for src in sources:
        with ExpertBank.open(src, readonly=True) as bank:
            total += len(bank)
    with tqdm(total=total, desc=desc, unit="expert") as bar:
        n = merge_banks(sources, dst, dtype, progress=bar.update)
    KnowledgeBase.open(dst).close()  # a writable open builds the router index from the bank
    with ExpertBank.open(dst, readonly=True) as bank:
        size = sum(i.bytes for i in bank.list())
        print(f"{n} experts written, {total - n} already there; {dst} holds {len(bank)} "
              f"{bank.dtype} experts, {size / max(len(bank), 1):,.0f} B each")
    return 0


def run_migrate(args: argparse.Namespace) -> int:
    from dmoe.experts.integrity import migrate_bank

    n = migrate_bank(_need_bank(args))
    print(f"migrated {n} experts to bank format 2" if n else "the bank is already current")
    return 0
