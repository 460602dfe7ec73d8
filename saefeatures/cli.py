"""The `saefeatures` command line: thin calls into the library, one subcommand per stage."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from .config import RunConfig, load_config

log = logging.getLogger("saefeatures")


def _config(path: str | None) -> RunConfig:
    return load_config(path) if path else RunConfig()


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_corpus_build(args: argparse.Namespace) -> None:
    from .corpus import build_corpus, compress, corpus_stats, lexicon_valence_check, read_records
    from .generation import Generator
    from .models import load_hf

    cfg = _config(args.config)
    build = cfg.corpus.build
    if args.seed is not None:
        build.seed = args.seed
    if args.emotions:
        build.emotions = args.emotions.split(",")
    if args.stories_per_emotion is not None:
        build.stories_per_emotion = args.stories_per_emotion
    if args.general_texts is not None:
        build.general_texts = args.general_texts
    hf, tokenizer, identity = load_hf(cfg.model.name, device=cfg.model.device)
    report = build_corpus(build, args.out, Generator(hf, tokenizer, build.generation), identity.name,
                          skip_corrupt=args.skip_corrupt)
    records = list(read_records(args.out))
    kept = [r for r in records if r.dropped is None]
    summary = {"this_run": {"generated": report.generated, "kept": report.kept,
                            "dropped": dict(report.dropped), "new_tokens": report.new_tokens,
                            "seconds": round(report.seconds, 1),
                            "tokens_per_s": round(report.tokens_per_s, 1)},
               "corpus": corpus_stats(kept, records), "lexicon_check": lexicon_valence_check(kept)}
    if args.ship:
        compress(args.out, args.ship)
        summary["shipped"] = args.ship
    _print(summary)


def cmd_corpus_stats(args: argparse.Namespace) -> None:
    from .corpus import DEFAULT_CORPUS, corpus_stats, lexicon_valence_check, read_records

    path = args.path or DEFAULT_CORPUS
    records = list(read_records(path, args.skip_corrupt))
    kept = [r for r in records if r.dropped is None and r.kind != "general"]
    _print({"path": str(path), **corpus_stats(kept, records), "lexicon_check": lexicon_valence_check(kept)})


def cmd_corpus_validate(args: argparse.Namespace) -> None:
    from .corpus import DEFAULT_CORPUS, validate_corpus

    path = args.path or DEFAULT_CORPUS
    _print({"path": str(path), "valid": True, **validate_corpus(path)})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saefeatures", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="build, inspect and check the emotion-story corpus")
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="generate stories and neutral texts with the model (resumable)")
    b.add_argument("--config", help="run config YAML (model and corpus.build sections)")
    b.add_argument("--out", required=True, help="JSONL file to write (rerun to resume)")
    b.add_argument("--ship", help="also write a gzip copy here when done")
    b.add_argument("--seed", type=int)
    b.add_argument("--emotions", help="comma-separated subset (default: all 171)")
    b.add_argument("--stories-per-emotion", type=int)
    b.add_argument("--general-texts", type=int)
    b.add_argument("--skip-corrupt", action="store_true", help="skip corrupt lines instead of failing")
    b.set_defaults(func=cmd_corpus_build)
    for name, func, text in (("stats", cmd_corpus_stats, "counts per emotion, split, filter"),
                             ("validate", cmd_corpus_validate, "strict check of every line")):
        s = csub.add_parser(name, help=text)
        s.add_argument("path", nargs="?", help="corpus JSONL(.gz); default: the shipped corpus")
        if name == "stats":
            s.add_argument("--skip-corrupt", action="store_true")
        s.set_defaults(func=func)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, KeyError) as e:
        log.error("%s", e)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
