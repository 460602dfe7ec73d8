"""Build the emotion-story corpus with the subject model (resumable: rerun the same command).

    python scripts/build_corpus.py --out runs/corpus-build/smollm2-135m-instruct.jsonl \
        --ship saefeatures/data/corpus/smollm2-135m-instruct.jsonl.gz

Same as `saefeatures corpus build`; this script exists for long background builds.
"""

import sys

from saefeatures.study.cli import main

if __name__ == "__main__":
    main(["corpus", "build", *sys.argv[1:]])
