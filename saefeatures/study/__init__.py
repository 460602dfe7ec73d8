"""The study on top of the library: the run config, the run directory, the cached stages of
`saefeatures run`, wandb tracking and the command line. Nothing below this package imports it."""
