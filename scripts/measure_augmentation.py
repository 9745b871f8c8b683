"""Measure the ``self`` augmenter on the packaged base model: QA JSON parse rate and s/unit.

    PYTHONPATH=src python scripts/measure_augmentation.py --n 20 --batch-size 8 --out runs/aug.jsonl

Units: the first paragraph of each of the first ``--n`` articles of SQuAD v1.1 dev (one passage
each, varied topics). Prints the ``measure_augmentation`` dict as JSON; ``--out`` also writes every
augmentation (with the raw QA output in ``meta.qa_raw``) for inspection.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

from dmoe.augment import Augmentation, make_augmenter, measure_augmentation
from dmoe.augment.cache import augmentation_to_dict
from dmoe.base_model import load_base_model
from dmoe.corpus.units import KnowledgeUnit
from dmoe.eval.datasets import data_dir

SQUAD = data_dir() / "squad/squad_dev_v1.1.json"


def squad_units(n: int, path: Path = SQUAD) -> list[KnowledgeUnit]:
    articles = json.loads(path.read_text())["data"][:n]
    return [KnowledgeUnit(id=f"squad-{i}", text=a["paragraphs"][0]["context"],
                          title=a["title"].replace("_", " ")) for i, a in enumerate(articles)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--n", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--device", default=None)
    parser.add_argument("--augmenter", default="self")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ["HF_HUB_OFFLINE"] = "1"
    units = squad_units(args.n)
    loaded = (load_base_model(args.model, device=args.device, training=True)
              if args.augmenter == "self" else None)
    augmenter = make_augmenter(args.augmenter, loaded=loaded, batch_size=args.batch_size)
    if loaded is not None:
        augmenter.settings  # noqa: B018  (fingerprint once, outside the timing)
    augs: list[Augmentation] = []
    result = measure_augmentation(units, augmenter, keep=augs)
    result["device"] = str(loaded.device) if loaded is not None else "none"
    print(json.dumps(result, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("w") as f:
            for unit, aug in zip(units, augs, strict=True):
                f.write(json.dumps({"unit_id": unit.id, "passage": unit.text,
                                    "augmentation": augmentation_to_dict(aug)}) + "\n")


if __name__ == "__main__":
    main()
