"""``dmoe bench faults``: kill a build at every crash point, corrupt every file of a bank, and count
what was lost (it must be nothing).

Everything runs on a tiny random Llama and a byte tokenizer built in-process, so it needs no model
download and takes a minute or two on a laptop CPU.

Kills. A bank holds version 1 of a small corpus; a build (``dmoe.training.build.build``) or a
server knowledge job (``dmoe.server.jobs``) then writes version 2 (one document shortened and
changed, one unchanged, one new) and is ``SIGKILL``ed at a seeded crash point
(``dmoe.faults.POINTS``, the n-th time it is reached). The killed process is forked from a warm
"zygote" process that has already imported torch (a cold interpreter takes ~10 s to import it on
a busy 2-core machine; the fork takes milliseconds), so each kill costs only its own work. After
each kill: restart (open the bank for writing, which recovers; for a job, a new ``ServerState``,
which resumes the job), check that every document is wholly at version 1 or wholly at version 2,
``bank check --deep`` clean, then a rerun that completes; an expert of version 2 missing at the end
counts as lost.

Corruptions. On copies of the version-1 bank: database missing, truncated or garbage; index
missing, manifest garbage, tantivy metadata garbage; an expert file truncated, bit-flipped,
NaN-filled (with a consistent checksum), deleted, with a garbage header; an orphan file. Each must
be detected by ``check_knowledge(deep=True)``, repaired (``repair=True``), and after a rebuild no
expert may be missing.

This module is a benchmark script in the package so the CLI and the fault tests share it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import traceback
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

# (mode, point, n): the fixed, seeded plan. A version-2 build reaches each point this often:
# build.augmented 1, build.chunk_trained 2, bank.staged 4, bank.in_transaction 2,
# bank.committed 2, build.indexed 2 (a job also job.submitted 1, job.started 1).
KILL_PLAN: tuple[tuple[str, str, int], ...] = (
    ("build", "build.augmented", 1), ("build", "build.chunk_trained", 1),
    ("build", "build.chunk_trained", 2), ("build", "bank.staged", 1), ("build", "bank.staged", 2),
    ("build", "bank.staged", 3), ("build", "bank.staged", 4), ("build", "bank.in_transaction", 1),
    ("build", "bank.in_transaction", 2), ("build", "bank.committed", 1),
    ("build", "bank.committed", 2), ("build", "build.indexed", 1), ("build", "build.indexed", 2),
    ("job", "job.submitted", 1), ("job", "job.started", 1), ("job", "build.augmented", 1),
    ("job", "build.chunk_trained", 2), ("job", "bank.staged", 2),
    ("job", "bank.in_transaction", 1), ("job", "bank.committed", 2), ("job", "build.indexed", 1),
)
CORRUPTIONS = ("sqlite_missing", "sqlite_truncated", "sqlite_garbage", "index_missing",
               "index_manifest_garbage", "index_tantivy_garbage", "expert_truncated",
               "expert_bitflip", "expert_nan", "expert_missing", "expert_header_garbage",
               "orphan_file")
V1 = {
    "velmora": "Velmora is a river town. It was founded by Tamsin Oker in 1702. Its market sells "
               "salt and amber. The town has seven green towers. A ferry crosses the river every "
               "hour. The mayor is elected for four years.",
    "zorbit": "The zorbit is a blue fruit grown only on Kelvar Island. It tastes of cinnamon.",
    "loom": "The thermal loom was invented in 1891 by Helena Marsk, an engineer from Brenholt.",
}
V2 = {
    "velmora": "Velmora is a lake town. It was founded by Ada Quell in 1802. Its market sells "
               "wool and tin. A bridge crosses the lake.",
    "zorbit": V1["zorbit"],
    "kestrel": "Kestrel Bay is a harbour town with a blue lighthouse. Its fishermen sail at dawn "
               "and sell their catch at noon.",
}


class ByteTokenizer:
    """Byte-level stand-in for a HF tokenizer: ids 0..255 are bytes, 256 is EOS."""

    eos_token_id = 256
    chat_template = None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": list(text.encode("utf-8"))}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Any, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


def tiny_lm(seed: int = 0) -> Any:
    """A 2-layer random Llama (hidden 64) + ``ByteTokenizer`` as a ``LoadedModel``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dmoe.base_model import LoadedModel, ModelSource, model_fingerprint

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=257, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         eos_token_id=256, bos_token_id=None, pad_token_id=None,
                         initializer_range=0.1)
    model = LlamaForCausalLM(config).eval().requires_grad_(False)
    return LoadedModel(model=model, tokenizer=ByteTokenizer(), device=torch.device("cpu"),
                       source=ModelSource("tiny", Path("tiny"), False), fingerprint=model_fingerprint(model))


def configs() -> tuple[Any, Any]:
    from dmoe.training.build import BuildConfig
    from dmoe.training.experts import TrainConfig

    return (BuildConfig(passage_words=10, augmenter="none", chunk_size=3),  # kestrel spans 2 chunks
            TrainConfig(epochs=1, max_seq_len=128))


def write_corpus(path: Path, docs: dict[str, str]) -> Path:
    path.write_text("".join(json.dumps({"id": k, "title": k, "text": v}) + "\n"
                            for k, v in docs.items()))
    return path


def expected(docs: dict[str, str]) -> dict[str, dict[str, str]]:
    """``{doc: {unit id: content hash}}`` a build of ``docs`` stores."""
    from dmoe.corpus import read_corpus
    from dmoe.experts.bank import doc_of

    build_config, _ = configs()
    out: dict[str, dict[str, str]] = {}
    with_text = write_corpus(Path(os.environ.get("TMPDIR", "/tmp")) / f"dmoe-x-{os.getpid()}.jsonl",
                             docs)
    try:
        for unit in read_corpus(with_text, passage_words=build_config.passage_words).units:
            out.setdefault(doc_of(unit.id), {})[unit.id] = unit.content_hash
    finally:
        with_text.unlink()
    return out


def stored(bank: Path) -> dict[str, dict[str, str]]:
    from dmoe.experts.bank import ExpertBank

    out: dict[str, dict[str, str]] = {}
    with ExpertBank.open(bank, readonly=True) as b:
        for info in b.list():
            out.setdefault(info.doc_id, {})[info.id] = info.content_hash
    return out


def quiet_build(lm: Any, corpus: Path, bank: Path) -> Any:
    from dmoe.training.build import build

    build_config, train_config = configs()
    return build(corpus, bank, lm, build_config, train_config, progress=False, log=lambda s: None)


# -- the process that gets killed ------------------------------------------------------------------

def _run_job(lm: Any, bank: Path, corpus: Path, timeout: float = 120.0) -> str:
    """Post ``corpus`` as a server knowledge job on ``bank`` and wait for it; its status."""
    from dmoe.knowledge import KnowledgeBase
    from dmoe.server import ServerConfig, ServerState

    build_config, train_config = configs()
    kb = KnowledgeBase.open(bank, lm.fingerprint)
    state = ServerState(lm, kb, ServerConfig(), build_config=build_config,
                        train_config=train_config)
    try:
        interrupted = [j.id for j in state.jobs.store.unfinished()]
        state.jobs.start()  # resumes the interrupted ones
        docs = [json.loads(line) for line in corpus.read_text().splitlines()]
        job_ids = [state.jobs.submit(docs).id] if docs else interrupted
        deadline = time.time() + timeout
        for jid in job_ids:
            while (job := state.jobs.get(jid)) is not None and job.status not in ("succeeded",
                                                                                  "failed"):
                assert time.time() < deadline, f"job {jid} did not finish"
                time.sleep(0.02)
        statuses = [state.jobs.get(j) for j in job_ids]
        return ",".join(j.status if j else "missing" for j in statuses) or "none"
    finally:
        state.close()


def zygote() -> None:
    """Read ``{"mode", "bank", "corpus", "kill_at"}`` lines on stdin; fork a child for each that
    runs it with ``$DMOE_FAULT_KILL_AT``; answer ``{"status": waitpid status}`` on stdout."""
    import torch

    torch.set_num_threads(1)
    lm = tiny_lm()
    print(json.dumps({"ready": lm.fingerprint}), flush=True)
    for line in sys.stdin:
        task = json.loads(line)
        pid = os.fork()
        if pid == 0:
            code = 0
            try:
                os.environ["DMOE_FAULT_KILL_AT"] = task["kill_at"]
                if task["mode"] == "build":
                    quiet_build(lm, Path(task["corpus"]), Path(task["bank"]))
                else:
                    _run_job(lm, Path(task["bank"]), Path(task["corpus"]))
            except BaseException:
                traceback.print_exc()
                code = 1
            os._exit(code)
        _, status = os.waitpid(pid, 0)
        print(json.dumps({"status": status}), flush=True)


class Zygote:
    """The warm process kills are forked from (see the module docstring)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "DMOE_FAULT_KILL_AT": ""}
        self.proc = subprocess.Popen([sys.executable, "-c",
                                      "from dmoe.bench.faults import zygote; zygote()"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                     env=env)
        ready = json.loads(self._line())
        self.fingerprint = ready["ready"]

    def _line(self) -> str:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"the fault zygote died (exit {self.proc.wait()})")
        return line

    def run(self, mode: str, bank: Path, corpus: Path, kill_at: str) -> int:
        """Run one task in a forked child; its exit code (``-9`` when it was killed)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"mode": mode, "bank": str(bank),
                                          "corpus": str(corpus), "kill_at": kill_at}) + "\n")
        self.proc.stdin.flush()
        status = json.loads(self._line())["status"]
        return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        self.proc.wait(30)


# -- kill cases ------------------------------------------------------------------------------------

@dataclass
class KillResult:
    mode: str
    point: str
    n: int
    killed: bool  # the process really died by SIGKILL at the point
    atomic: bool  # after the restart every document was wholly version 1 or version 2
    check_clean: bool  # bank check --deep after the restart
    lost: list[str]  # version-2 experts missing after the rerun
    final_clean: bool  # bank check --deep after the rerun


def prepare(work: Path, lm: Any) -> tuple[Path, Path, Path]:
    """The version-1 bank and the two corpora under ``work``."""
    work.mkdir(parents=True, exist_ok=True)
    v1, v2 = write_corpus(work / "v1.jsonl", V1), write_corpus(work / "v2.jsonl", V2)
    base = work / "base"
    if not base.exists():
        quiet_build(lm, v1, base)
    return base, v1, v2


def kill_case(zyg: Zygote, lm: Any, work: Path, mode: str, point: str, n: int) -> KillResult:
    from dmoe.knowledge import KnowledgeBase, check_knowledge

    base, _, v2 = prepare(work, lm)
    bank = work / f"{mode}-{point}-{n}"
    shutil.rmtree(bank, ignore_errors=True)
    shutil.copytree(base, bank)
    rc = zyg.run(mode, bank, v2, f"{point}:{n}")
    KnowledgeBase.open(bank, lm.fingerprint).close()  # the restart: recovery on open
    have, old, new = stored(bank), expected(V1), expected(V2)
    atomic = all(units in (old.get(doc), new.get(doc)) for doc, units in have.items())
    if mode == "job":  # the restart resumes the job (a killed submit left it queued)
        atomic = atomic and _run_job(lm, bank, write_corpus(work / "empty.jsonl", {})) in (
            "succeeded", "none")
    check_clean = check_knowledge(bank, deep=True).ok
    quiet_build(lm, v2, bank)  # the rerun
    have = stored(bank)
    lost = sorted(u for doc, units in new.items() for u in units if u not in have.get(doc, {}))
    stale = [doc for doc in new if have.get(doc) != new[doc]]
    return KillResult(mode, point, n, rc == -signal.SIGKILL, atomic and not stale, check_clean,
                      lost, check_knowledge(bank, deep=True).ok)


# -- corruption cases ------------------------------------------------------------------------------

@dataclass
class CorruptionResult:
    kind: str
    detected: bool
    repaired: bool  # bank check --deep clean after --repair and a rebuild
    lost: list[str]


def corrupt(bank: Path, kind: str) -> None:
    """Damage ``bank`` the way ``kind`` says (see ``CORRUPTIONS``)."""
    from dmoe.experts.bank import ExpertBank
    from dmoe.experts.format import write_expert

    with ExpertBank.open(bank, readonly=True) as b:
        info = b.list()[0]
        expert = b.get(info.id) if kind == "expert_nan" else None
        fingerprint = b.fingerprint
    path = bank / "experts" / info.file
    db = bank / "bank.sqlite"
    if kind.startswith("sqlite"):
        for suffix in ("-wal", "-shm"):
            (bank / f"bank.sqlite{suffix}").unlink(missing_ok=True)
    if kind == "sqlite_missing":
        db.unlink()
    elif kind == "sqlite_truncated":
        db.write_bytes(db.read_bytes()[: db.stat().st_size // 3])
    elif kind == "sqlite_garbage":
        db.write_bytes(os.urandom(db.stat().st_size))
    elif kind == "index_missing":
        shutil.rmtree(bank / "index")
    elif kind == "index_manifest_garbage":
        (bank / "index" / "router.json").write_bytes(b"\x00garbage{")
    elif kind == "index_tantivy_garbage":
        (bank / "index" / "tantivy" / "meta.json").write_text("{not json")
    elif kind == "expert_truncated":
        path.write_bytes(path.read_bytes()[:-64])
    elif kind == "expert_bitflip":
        data = bytearray(path.read_bytes())
        data[-5] ^= 0x04
        path.write_bytes(bytes(data))
    elif kind == "expert_nan":
        import sqlite3

        assert expert is not None
        next(iter(expert.weights.values())).view(-1)[3] = float("nan")
        written = write_expert(path, expert, fingerprint)
        con = sqlite3.connect(db)
        con.execute("UPDATE experts SET checksum=?, bytes=? WHERE id=?",
                    (written.checksum, written.size, info.id))
        con.commit()
        con.close()
    elif kind == "expert_missing":
        path.unlink()
    elif kind == "expert_header_garbage":
        data = bytearray(path.read_bytes())
        data[8:40] = b"#" * 32
        path.write_bytes(bytes(data))
    elif kind == "orphan_file":
        shutil.copy(path, bank / "experts" / "0123456789abcdef01234567-deadbeef.safetensors")
    else:
        raise ValueError(f"unknown corruption {kind!r}")


def corruption_case(lm: Any, work: Path, kind: str) -> CorruptionResult:
    from dmoe.knowledge import check_knowledge

    base, v1, _ = prepare(work, lm)
    bank = work / f"corrupt-{kind}"
    shutil.rmtree(bank, ignore_errors=True)
    shutil.copytree(base, bank)
    corrupt(bank, kind)
    detected = not check_knowledge(bank, deep=True).ok
    check_knowledge(bank, deep=True, repair=True)
    quiet_build(lm, v1, bank)
    want = expected(V1)
    have = stored(bank)
    lost = sorted(u for doc, units in want.items() for u in units if u not in have.get(doc, {}))
    return CorruptionResult(kind, detected, check_knowledge(bank, deep=True).ok, lost)


def bench_faults(work: Path, fuzz_cases: int = 500) -> dict[str, Any]:
    """Every kill in ``KILL_PLAN``, every corruption, and ``fuzz_cases`` fuzzed requests."""
    import torch

    torch.set_num_threads(1)
    t0 = time.perf_counter()
    lm = tiny_lm()
    zyg = Zygote()
    try:
        assert zyg.fingerprint == lm.fingerprint, "the zygote built another model"
        kills = [kill_case(zyg, lm, work, *case) for case in KILL_PLAN]
    finally:
        zyg.close()
    corruptions = [corruption_case(lm, work, kind) for kind in CORRUPTIONS]
    fuzz: dict[str, Any] = {"fuzz_cases": 0, "fuzz_5xx": 0, "fuzz_note": "hypothesis missing"}
    if fuzz_cases:
        try:
            from dmoe.bench.fuzz import fuzz_server
        except ImportError as e:
            fuzz["fuzz_note"] = f"not run: {e}"
        else:
            fuzz = fuzz_server(lm, work / "fuzz", fuzz_cases)
    return {
        "kill_points": sum(k.killed for k in kills),
        "kill_points_planned": len(KILL_PLAN),
        "experts_lost": sum(len(k.lost) for k in kills) + sum(len(c.lost) for c in corruptions),
        "kills_atomic": sum(k.atomic for k in kills),
        "kills_check_clean_after_restart": sum(k.check_clean for k in kills),
        "kills_clean_after_rerun": sum(k.final_clean for k in kills),
        "corruptions_tried": len(corruptions),
        "corruptions_detected": sum(c.detected for c in corruptions),
        "corruptions_repaired": sum(c.repaired for c in corruptions),
        **fuzz,
        "seconds": round(time.perf_counter() - t0, 1),
        "failures": [asdict(k) for k in kills if not (k.killed and k.atomic and k.check_clean
                                                      and not k.lost and k.final_clean)]
                    + [asdict(c) for c in corruptions if not (c.detected and c.repaired
                                                              and not c.lost)],
    }
