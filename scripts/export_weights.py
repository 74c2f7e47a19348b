"""Export a training checkpoint as the shipped model: weights + metadata stating data, terms and recipe.

    python scripts/export_weights.py runs/default/best weights/hih_cpu_300w
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from model.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

TERMS = (
    "Trained on 300-W (iBUG) annotations of AFW, HELEN and LFPW images: research use only, no commercial use, "
    "including training commercial models. The weights inherit these terms. See weights/MODEL_CARD.md."
)


def main(src: str, dst: str) -> None:
    model, meta = load_checkpoint(src)
    name = Path(dst).name
    meta = {
        **meta,
        "version": f"{name}-e{meta.get('epoch', 0)}",
        "terms": TERMS,
        "exported_from": str(src),
        "training_data": "300-W train (AFW 337, HELEN 870, LFPW 805 face crops) less a 100-face holdout",
    }
    meta.pop("created", None)
    out = save_checkpoint(dst, model, meta)
    print(f"exported {src} -> {out} as version {meta['version']}")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
