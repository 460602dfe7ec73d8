"""`python -m saefeatures` and `torchrun -m saefeatures`: the same CLI as the `saefeatures` command."""

from .study.cli import main

main()
