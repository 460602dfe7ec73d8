#!/usr/bin/env python
"""Train an SAE at a config's layer with SAELens; the same code path as `saefeatures sae train`.

Reads everything from the run config (configs/*.yaml): model name, layer, device and dtype
(`model`), the corpus (`corpus.path`), wandb project and mode (`tracking`), and the SAE's
architecture, width, k, batch sizes and training tokens (`sae.train`). Rerun the same command to
resume from the latest checkpoint.

    python train/train_sae.py configs/smollm2-135m.yaml --out runs/sae/smollm2-135m-instruct-L20
    python train/train_sae.py configs/gemma-2-2b.yaml --device cuda --tokens 50000000
"""

from saefeatures.sae_training import main

if __name__ == "__main__":
    main()
