"""Generates the embedded default corpus into data/default/ (deterministic; a few seconds).

    python data/generate.py              # train.jsonl + heldout.jsonl (gitignored); tokenizer.model if missing
    python data/generate.py --retrain    # also retrain tokenizer.model (same bytes: training is deterministic)
    python data/generate.py --check      # verify the committed tokenizer.model is reproduced bit-exactly

The corpus itself (tasks, held-out split, answer checking) lives in `ernie_jax/synthetic/text.py`;
`ernie_jax.synthetic.text.default_data_config()` also generates it on first use.
"""

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ernie_jax.synthetic import text  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "default"))
    ap.add_argument("--retrain", action="store_true", help="retrain tokenizer.model")
    ap.add_argument("--check", action="store_true", help="check that retraining reproduces tokenizer.model")
    a = ap.parse_args()
    paths = text.generate(a.out, retrain_tokenizer=a.retrain)
    for k, p in paths.items():
        print(f"{k}: {p} ({p.stat().st_size:,} bytes)")
    if a.check:
        same = text.train_tokenizer_bytes(paths["train"]) == paths["tokenizer"].read_bytes()
        print("tokenizer.model reproduced bit-exactly" if same else "tokenizer.model differs from a retrain")
        return 0 if same else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
