#!/usr/bin/env python
"""Train an SAE at a config's layer with SAELens: `saefeatures sae train`, runnable without installing.

Reads everything from the run config (configs/*.yaml): model name, layer, device and dtype
(`model`), the corpus (`corpus.path`), wandb project and mode (`tracking`), and the SAE's
architecture, width, k, batch sizes and training tokens (`sae.train`). Rerun the same command to
resume from the latest checkpoint.

    python train/train_sae.py configs/smollm2-135m.yaml --out runs/sae/smollm2-135m-instruct-L18
    python train/train_sae.py configs/gemma-2-2b.yaml --device cuda --tokens 50000000
"""

import sys

from saefeatures.study.cli import main

if __name__ == "__main__":
    args = sys.argv[1:]
    main(["sae", "train", *(["--config", *args] if args and not args[0].startswith("-") else args)])
