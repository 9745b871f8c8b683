"""``dmoe ablate NAME``: sweep one DMoE knob over its arms on one dataset (see dmoe.eval.ablate)."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import platform
import sys
import time
from pathlib import Path
from typing import Any

from dmoe.commands.common import add_model_args

EXAMPLE = """example:
  dmoe ablate tau --dataset knowledge_conflicts --limit 100 --bank BANK --out results/ablations
  dmoe ablate trigger --dataset hotpotqa --limit 100 --bank HP_BANK --out results/ablations
  dmoe ablate dtype --dataset knowledge_conflicts --limit 100 --bank BANK --out results/ablations
  dmoe ablate rank --dataset knowledge_conflicts --limit 100 --out results/ablations \
      --work /tmp/ablation-banks      # trains one bank per rank on the questions' passages
  dmoe ablate tau --report-only --out results/ablations   # rebuild summary.json, table.md, plot

Rerunning the same command resumes every arm where it stopped. Each arm is the shipped
configuration with the overrides listed by --list-arms."""


def register(sub: argparse._SubParsersAction) -> None:
    from dmoe.eval.ablate import NAMES
    from dmoe.eval.datasets import DEFAULT_LIMIT, LOADERS

    p = sub.add_parser("ablate", help="sweep one DMoE knob (" + ", ".join(NAMES) + ")",
                       description=(__doc__ or "") + "\n\n" + EXAMPLE,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name", choices=NAMES, help="the ablation")
    p.add_argument("--dataset", default="knowledge_conflicts", choices=list(LOADERS),
                   help="one benchmark (default knowledge_conflicts)")
    p.add_argument("--limit", type=int, default=DEFAULT_LIMIT, help="questions (0 = all)")
    p.add_argument("--offset", type=int, default=0, help="skip this many questions first")
    p.add_argument("--corpus-scope", default="full", choices=["full", "gold"],
                   help="as dmoe eval: gold = only the passages holding the selected questions' "
                        "answers (what rank and placement train their banks on; HotpotQA's full "
                        "scope is ~10 passages per question)")
    p.add_argument("--out", type=Path, help="writes OUT/NAME/ (created/resumed); required")
    p.add_argument("--bank", default=None, type=Path, metavar="DIR",
                   help="the expert bank (rank and placement train their own; dtype converts it)")
    p.add_argument("--work", default=None, type=Path, metavar="DIR",
                   help="where arms' own banks go (default OUT/NAME/banks; resumed, not results)")
    p.add_argument("--experts", default=None, type=Path, metavar="DIR",
                   help="instead of --bank: a folder of {unit_id}.safetensors experts")
    p.add_argument("--router-index", default=None, type=Path, metavar="PATH",
                   help="BM25 index over expert surrogates (default: the bank's)")
    p.add_argument("--data-dir", default=None, help="benchmark data folder")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="a knob applied to every arm (before the arm's own overrides)")
    p.add_argument("--batch-size", type=int, default=1, metavar="B",
                   help="answer B questions per batch (as dmoe eval --batch-size; same answers)")
    p.add_argument("--arm", dest="arms", action="append", default=None, metavar="LABEL",
                   help="run only this arm (repeatable; a label as --list-arms prints it, 'base' "
                        "for the base row): several processes can share one ablation")
    p.add_argument("--list-arms", action="store_true", help="print the arms and exit")
    p.add_argument("--report-only", action="store_true", help="only rebuild the summary files")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_model_args(p)
    p.set_defaults(func=run, sft_lora=None, poly=None, poly_top_k=None)


def run(args: argparse.Namespace) -> int:
    from dmoe.eval.ablate import ARMS, table, write_ablation

    if args.list_arms:
        for arm in ARMS[args.name]:
            extra = " + trigger_rate matched to the entropy arm" if arm.derive else ""
            if arm.router:
                extra += f" router={arm.router}"
            if arm.distractors is not None:
                extra += f" + {arm.distractors:g} of the other experts"
            if arm.dtype:
                extra += f" bank stored in {arm.dtype}"
            if arm.spec:
                extra += (f" own bank: rank {arm.spec.rank}, alpha {arm.spec.alpha:g}, last "
                          f"{arm.spec.n_layers} layer(s)")
            print(f"{arm.label:<24} method={arm.method} {' '.join(arm.overrides)}{extra}")
        return 0
    if args.out is None:
        raise ValueError("dmoe ablate needs --out DIR (the arms' results go to DIR/NAME/)")
    if not args.report_only:
        own_banks = all(arm.spec is not None for arm in ARMS[args.name])
        if args.bank is None and args.experts is None and not own_banks:
            raise ValueError("dmoe ablate needs the experts: --bank DIR (or --experts DIR)")
        _run_arms(args)
    summary = write_ablation(args.out, args.name)
    print(table(summary))
    print(f"wrote {args.out / args.name}/summary.json, table.md, plot.png")
    return 0


def _run_arms(args: argparse.Namespace) -> None:
    from dmoe.baselines.protocol import MethodConfig
    from dmoe.baselines.registry import build_method
    from dmoe.baselines.retrieval import PassageRetriever
    from dmoe.commands.eval import load_resources
    from dmoe.eval.ablate import ARMS, Arm, arm_overrides
    from dmoe.eval.datasets import load_task
    from dmoe.eval.runner import log_invocation, run_task

    arms = select_arms([Arm("base", "base", method="base"), *ARMS[args.name]], args.arms)
    root = args.out / args.name
    runs = root / "runs"
    shared = MethodConfig().with_overrides(args.overrides)
    # check_weights reads OUT/runs.jsonl: one weights mode per ablation folder
    # arms with experts on more layers need those MLPs float under packed weights
    float_mlps = max((arm.spec.n_layers for arm in ARMS[args.name] if arm.spec), default=1)
    lm, res = load_resources(argparse.Namespace(**{**vars(args), "out": root,
                                                   "float_mlps": float_mlps}), shared)
    task = load_task(args.dataset, args.data_dir, offset=args.offset, limit=args.limit or None,
                     corpus_scope=args.corpus_scope)
    log_invocation(root, {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                          "argv": sys.argv, "ablation": args.name, "weights": lm.weights})
    retriever = PassageRetriever(task.corpus)
    banks = _ArmBanks(args.work or root / "banks", args, task)
    try:
        for arm in arms:
            overrides = arm_overrides(arm, runs, task.name)
            config = shared.with_overrides(list(overrides))
            log_invocation(runs / arm.slug, {
                "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "argv": sys.argv,
                "ablation": args.name, "arm": arm.label, "method": arm.method,
                "overrides": list(overrides), "dataset": args.dataset, "limit": args.limit,
                "offset": args.offset, "corpus_scope": args.corpus_scope,
                "batch_size": args.batch_size,
                "config": dataclasses.asdict(config),
                "model": str(lm.source.path), "weights": lm.weights, "device": str(lm.device),
                "platform": platform.platform()})
            arm_res = dataclasses.replace(res, config=config)
            if arm.distractors is not None:
                arm_res = _cut_bank(arm_res, args.bank, task, arm.distractors, config.seed)
            if arm.router is not None:
                arm_res = _other_router(arm_res, args.bank, arm.router)
            if arm.bank_variant is not None:
                arm_res, bank_info = _over_bank(arm_res, lm, banks.prepare(arm), arm)
                bank_file = runs / arm.slug / task.name / "bank.json"  # one per dataset
                bank_file.parent.mkdir(parents=True, exist_ok=True)
                bank_file.write_text(json.dumps(bank_info, indent=1) + "\n")
            build = functools.partial(build_method, res=arm_res, retriever=retriever)
            ran = run_task(task, [arm.method], build, runs / arm.slug,
                           progress=not args.no_progress, batch_size=args.batch_size)
            print(json.dumps({"arm": arm.label, "computed": ran}), file=sys.stderr)
    finally:
        retriever.close()
        banks.close()


def select_arms(arms: list[Any], wanted: list[str] | None) -> list[Any]:
    """The arms labelled in ``wanted`` (all when None), in ``arms``' order."""
    if wanted is None:
        return arms
    unknown = sorted(set(wanted) - {arm.label for arm in arms})
    if unknown:
        raise ValueError(f"--arm: unknown arm(s) {unknown}; this ablation's arms: "
                         + ", ".join(arm.label for arm in arms))
    return [arm for arm in arms if arm.label in wanted]


def _cut_bank(res: Any, bank_dir: Path | None, task: Any, fraction: float, seed: int) -> Any:
    """``res`` routing over the evaluated questions' own experts plus a seeded ``fraction`` of
    the bank's others (``dmoe.eval.ablate.cut_bank``): BM25 over those surrogates only."""
    from dmoe.eval.ablate import cut_bank
    from dmoe.experts.bank import ExpertBank
    from dmoe.routing.bm25 import BM25Index, BM25Router

    if bank_dir is None:
        raise ValueError("the bank_size ablation needs --bank")
    expert_of = res.expert_of or (lambda unit_id: unit_id)
    own = {expert_of(u) for s in task.samples for u in s.gold_unit_ids} - {None}
    kept = cut_bank(res.expert_ids, own, fraction, seed)
    with ExpertBank.open(bank_dir, readonly=True) as bank:
        index = BM25Index.in_memory()
        index.add_many((i, bank.surrogate(i)) for i in kept)
    print(json.dumps({"distractors": fraction, "experts": len(kept), "own": len(own)}),
          file=sys.stderr)
    return dataclasses.replace(res, router=BM25Router(index), expert_ids=kept)


def _other_router(res: Any, bank_dir: Path | None, name: str) -> Any:
    """``res`` with router ``name`` over the same bank's routing texts."""
    from dmoe.experts.bank import ExpertBank
    from dmoe.routing.factory import make_router

    if bank_dir is None:
        raise ValueError(f"the {name} router arm needs --bank")
    with ExpertBank.open(bank_dir, readonly=True) as bank:
        router = make_router(name, surrogates=bank.surrogates())
    return dataclasses.replace(res, router=router)


def _over_bank(res: Any, lm: Any, bank_dir: Path, arm: Any) -> tuple[Any, dict[str, Any]]:
    """``res`` over the arm's own bank (its experts, its BM25, an adapter of its shape), and what
    the arm's ``bank.json`` records of that bank (its size per expert)."""
    from dmoe.baselines.registry import attach_bank
    from dmoe.experts.bank import ExpertBank
    from dmoe.experts.lora import ExpertAdapter

    bank = ExpertBank.open(bank_dir, expected_fingerprint=lm.fingerprint, readonly=True)
    arm_res = dataclasses.replace(res, adapter=ExpertAdapter(lm.model, bank.spec))
    attach_bank(arm_res, bank)
    infos = bank.list()
    return arm_res, {"path": str(bank_dir), "experts": len(infos), "dtype": bank.dtype,
                     "spec": dataclasses.asdict(bank.spec),
                     "bytes_per_expert": sum(i.bytes for i in infos) / max(len(infos), 1)}


class _ArmBanks:
    """The banks of arms that need their own: ``--bank`` converted (``dtype``), or trained on the
    evaluated questions' passages with the arm's shape (``rank``, ``placement``). Each is made
    once, resumably, under ``work/<variant>``; the training model (float weights) is loaded on
    first need."""

    def __init__(self, work: Path, args: argparse.Namespace, task: Any) -> None:
        self.work, self.args, self.task = work, args, task
        self._trainer: Any = None
        self._jobs: Any = None

    def prepare(self, arm: Any) -> Path:
        from dmoe.experts.bank import ExpertBank, convert_bank

        assert arm.bank_variant is not None
        if arm.dtype is not None:
            if self.args.bank is None:
                raise ValueError("the dtype ablation converts --bank, which was not given")
            with ExpertBank.open(self.args.bank, readonly=True) as source:
                if source.dtype == arm.dtype:
                    return Path(self.args.bank)
            path = self.work / arm.bank_variant
            n = convert_bank(self.args.bank, path, arm.dtype)
            print(json.dumps({"arm": arm.label, "converted": n, "bank": str(path)}),
                  file=sys.stderr)
            return path
        return self._train(arm)

    def _train(self, arm: Any) -> Path:
        from dmoe.base_model import load_base_model
        from dmoe.training.build import BuildConfig
        from dmoe.training.experts import TrainConfig
        from dmoe.training.task_bank import expert_jobs, train_task_bank

        if self._trainer is None:
            self._trainer = load_base_model(self.args.model, self.args.device, training=True)
            self._jobs = expert_jobs(self._trainer, self.task.corpus)  # the shipped recipe
        path = self.work / arm.bank_variant
        train_task_bank(self._trainer, self._jobs, path, TrainConfig(spec=arm.spec),
                        desc=f"train {arm.bank_variant}", progress=not self.args.no_progress,
                        settings={"recipe": BuildConfig.recipe, "augmenter": "extractive"})
        return path

    def close(self) -> None:
        self._trainer = self._jobs = None
