"""The `saefeatures` command line: thin calls into the library, one subcommand per stage.

Every subcommand checks its config, files and arguments (`study.preflight`) before the
model loads; bad input ends in one line, ``error: ...``, and exit status 2 (``--debug``: the
traceback).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import replace
from pathlib import Path

from ..audit import audit_corpus
from ..corpus import DEFAULT_CORPUS, corpus_stats, lexicon_valence_check, load_corpus, read_records, validate_corpus
from ..corpus_build import build_corpus, compress, done_batches
from ..corpus_import import import_corpus
from ..directions import EmotionDirections
from ..distributed import RankFailure, joined, rank_tag
from ..errors import UserError
from ..generation import Generator
from ..geometry import analyze
from ..models import load_hf, load_model, resolve_dtype, resolve_layer
from ..neutral import NEUTRAL_PROMPTS
from ..report.geometry import save_plots
from ..sae import export_sae, load_sae, sae_info, shipped_sae_dir
from ..steering import parse_assignments, steer_prompts
from .browse import add_parsers as add_browse_parsers
from .config import RunConfig, load_config
from .layer_sweep import format_table, sweep_layers
from .pipeline import open_study, run_study
from .preflight import (check_corpus, check_model, check_sae_config, check_steer, check_training_corpus,
                        check_values)
from .sae_stages import evaluate_run_sae, stage_sae, stage_sae_directions, stage_scores, train_run_sae
from .stages import eval_data, report_directions, stage_activations, stage_dense, stage_emobank

log = logging.getLogger("saefeatures")


def _config(path: str | None) -> RunConfig:
    return load_config(path) if path else RunConfig()


def _print(obj: object) -> None:
    print(json.dumps(obj, indent=2, default=str))


def cmd_corpus_build(args: argparse.Namespace) -> None:
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
    check_values(cfg)
    check_model(cfg)
    done_batches(Path(args.out), args.skip_corrupt)  # a corrupt build file to resume fails here, not after loading
    with joined() as world:  # under torchrun the ranks share the batches
        hf, tokenizer, identity = load_hf(cfg.model.name, dtype=resolve_dtype(build.generation.dtype, cfg.model.device),
                                          device=cfg.model.device)
        report = build_corpus(build, args.out, Generator(hf, tokenizer, build.generation), identity.name,
                              skip_corrupt=args.skip_corrupt, world=world)
    if not world.leader:
        return
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
    path = args.path or DEFAULT_CORPUS
    records = list(read_records(path, args.skip_corrupt))
    kept = [r for r in records if r.dropped is None and r.kind != "general"]
    _print({"path": str(path), **corpus_stats(kept, records), "lexicon_check": lexicon_valence_check(kept)})


def cmd_corpus_validate(args: argparse.Namespace) -> None:
    path = args.path or DEFAULT_CORPUS
    _print({"path": str(path), "valid": True, **validate_corpus(path)})


def cmd_corpus_audit(args: argparse.Namespace) -> None:
    path = args.corpus or DEFAULT_CORPUS
    result = audit_corpus(load_corpus(path))
    _print({"path": str(path), **result.metrics(), "chance_top1": 1 / result.n_classes, "n_train": result.n_train,
            "hardest": [n for n, _ in sorted(result.per_emotion.items(), key=lambda kv: kv[1]["auroc"])[:5]],
            "easiest": [n for n, _ in sorted(result.per_emotion.items(), key=lambda kv: -kv[1]["auroc"])[:5]]})


def cmd_corpus_import(args: argparse.Namespace) -> None:
    report = import_corpus(args.src, args.out, model_id=args.model_id, drop_unknown=args.drop_unknown)
    _print(report.to_dict())


def cmd_sae_train(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    if args.tokens is not None:
        cfg.sae.train.training_tokens = args.tokens
    if args.device:
        cfg.model.device = args.device
    check_values(cfg)
    check_model(cfg)
    check_training_corpus(cfg)
    result = train_run_sae(cfg, out_dir=args.out, resume=not args.no_resume)
    if args.ship:
        export_sae(result.sae_dir, args.ship)
    _print({"sae_dir": str(result.sae_dir), **{k: v for k, v in result.info.items() if k != "loss_curve"}})


def cmd_sae_eval(args: argparse.Namespace) -> None:

    cfg = _config(args.config)
    for key in ("split", "max_tokens", "ce_tokens"):
        if getattr(args, key) is not None:
            setattr(cfg.sae.eval, key, getattr(args, key))
    check_values(cfg)
    check_model(cfg)
    check_corpus(cfg)
    check_sae_config(replace(cfg, sae=replace(cfg.sae, source="local", path=args.sae)) if args.sae else cfg)
    evals = evaluate_run_sae(cfg, sae_path=args.sae, save_to=args.save)
    _print({"metrics": evals.metrics(), **evals.to_dict()})


def cmd_sae_info(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    layer = resolve_layer(cfg.model.layer, cfg.model.name)
    path = args.path or cfg.sae.path or shipped_sae_dir(cfg.model.name, layer)
    info = sae_info(path)
    info.get("train_info", {}).pop("loss_curve", None)
    _print(info)


def cmd_run(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    with joined() as world:  # the processes torchrun started, or this one alone
        run = run_study(cfg, args.out, args.config, world=world)
    if world.leader:
        _print(run.metrics)


def cmd_activations(args: argparse.Namespace) -> None:
    study = open_study(_config(args.config), args.out, args.config)
    acts = stage_activations(study)
    _print({"records": len(acts.ids), "hooks": {k: list(v.shape) for k, v in acts.acts.items()},
            "dir": str(study.run.path / "activations")})


def cmd_directions(args: argparse.Namespace) -> None:
    study = open_study(_config(args.config), args.out, args.config)
    if args.recipe == "sae":  # scoring first: its forward pass also pools the train split
        sae = stage_sae(study)
        scores = stage_scores(study, sae)
    acts = stage_activations(study)
    evaluate = args.directions_command == "eval"
    data = eval_data(study, acts, stage_emobank(study)) if evaluate else None
    dense = stage_dense(study, acts)
    if args.recipe == "dense":
        if evaluate:
            report_directions(study, dense, data, "dense")
        _print({"saved": str(study.run.path / "directions" / "dense"), "emotions": len(dense.names),
                **({"metrics": study.run.metrics.get("dense")} if evaluate else {})})
        return
    built = stage_sae_directions(study, sae, scores, dense, data)
    _print({"saved": [str(study.run.path / "directions" / f"sae-k{k}") for k in built],
            **({"metrics": study.run.metrics.get("sae")} if evaluate else {})})


def cmd_score(args: argparse.Namespace) -> None:
    study = open_study(_config(args.config), args.out, args.config)
    scores = stage_scores(study, stage_sae(study))
    names = args.emotions.split(",") if args.emotions else ["happy", "sad", "afraid", "calm"]
    _print({"saved": str(study.run.path / "scores"),
            "top_latents": {n: scores.table(n, top=args.top) for n in names}})


def cmd_geometry(args: argparse.Namespace) -> None:
    dirs = EmotionDirections.load(args.directions)
    geo = analyze(dirs)
    files = save_plots(geo, args.out or args.directions, title=f"{dirs.recipe} directions, layer {dirs.layer}")
    _print({**geo.metrics(), "n_rated": geo.n_rated, "files": files})


def cmd_sweep(args: argparse.Namespace) -> None:
    cfg = _config(args.config)
    try:
        layers = [int(x) for x in args.layers.split(",")]
    except ValueError:
        raise UserError(f"--layers {args.layers}: expected comma-separated integers, e.g. 8,12,16.") from None
    cfg.activations.layers = layers
    check_values(cfg)
    check_model(cfg)
    check_corpus(cfg)
    rows = sweep_layers(cfg, layers, args.out)
    print(format_table(rows))


def cmd_steer(args: argparse.Namespace) -> None:

    cfg = _config(args.config)
    spec = cfg.steering.spec
    if args.emotion or args.latent:
        spec = replace(spec, emotions=parse_assignments(args.emotion or []),
                       latents=parse_assignments(args.latent or [], int))
    for key in ("method", "op", "positions", "hook"):
        if getattr(args, key) is not None:
            spec = replace(spec, **{key: getattr(args, key)})
    dirs = EmotionDirections.load(args.directions) if args.directions else None
    layer, needs_sae = check_steer(cfg, spec, dirs, args.directions, args.sae)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    sae = load_sae(args.sae or cfg.sae, model, layer=layer) if needs_sae else None
    rows = steer_prompts(model, spec, args.prompt or NEUTRAL_PROMPTS[:2], directions=dirs, sae=sae,
                         compare=not args.no_compare, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed, backend=args.backend)
    _print({"spec": spec.to_dict(), "replies": rows})


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="saefeatures", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    common = argparse.ArgumentParser(add_help=False)  # --debug after the subcommand too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", required=True)

    corpus = sub.add_parser("corpus", help="build, inspect and check the emotion-story corpus", parents=[common])
    csub = corpus.add_subparsers(dest="corpus_command", required=True)
    b = csub.add_parser("build", help="generate stories and neutral texts with the model (resumable)",
                        parents=[common])
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
        s = csub.add_parser(name, help=text, parents=[common])
        s.add_argument("path", nargs="?", help="corpus JSONL(.gz); default: the shipped corpus")
        if name == "stats":
            s.add_argument("--skip-corrupt", action="store_true")
        s.set_defaults(func=func)
    au = csub.add_parser("audit", help="model-free check: a bag-of-words classifier, train topics -> test topics")
    au.add_argument("--corpus", help="corpus JSONL(.gz); default: the shipped corpus")
    au.set_defaults(func=cmd_corpus_audit)
    im = csub.add_parser("import", help="write an external story set (emotion/topic/text JSONL) as a corpus")
    im.add_argument("src", help="a JSONL(.gz) story file or a directory of them (e.g. emotion-vector-bench/stories)")
    im.add_argument("--out", required=True, help="corpus file to write (.jsonl or .jsonl.gz)")
    im.add_argument("--model-id", default="unknown", help="the model that wrote the stories (recorded per record)")
    im.add_argument("--drop-unknown", action="store_true",
                    help="leave out stories of emotions outside the paper's 171 instead of failing")
    im.set_defaults(func=cmd_corpus_import)

    sae = sub.add_parser("sae", help="train, evaluate and inspect the SAE at the studied layer", parents=[common])
    ssub = sae.add_subparsers(dest="sae_command", required=True)
    t = ssub.add_parser("train", help="train an SAE with SAELens on the corpus (resumable)", parents=[common])
    t.add_argument("--config", help="run config YAML (model, corpus, tracking, sae.train)")
    t.add_argument("--out", help="output directory (default: sae.train.out or runs/sae/<model>-L<layer>)")
    t.add_argument("--tokens", type=int, help="override sae.train.training_tokens")
    t.add_argument("--device", help="override model.device (e.g. cuda)")
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    t.add_argument("--ship", help="also export the trained SAE here (bfloat16 weights)")
    t.set_defaults(func=cmd_sae_train)
    e = ssub.add_parser("eval", help="SAELens evals on the held-out corpus split", parents=[common])
    e.add_argument("--config", help="run config YAML (model, corpus, sae)")
    e.add_argument("--sae", help="SAE directory (default: the config's SAE)")
    e.add_argument("--split", help="corpus split (default: sae.eval.split, 'test')")
    e.add_argument("--max-tokens", type=int, help="tokens for explained variance, L0, dead latents")
    e.add_argument("--ce-tokens", type=int, help="tokens for the CE loss recovered")
    e.add_argument("--save", help="write the evals to this JSON file")
    e.set_defaults(func=cmd_sae_eval)
    i = ssub.add_parser("info", help="an SAE directory's config, training record and evals", parents=[common])
    i.add_argument("path", nargs="?", help="SAE directory (default: the config's or the shipped SAE)")
    i.add_argument("--config", help="run config YAML")
    i.set_defaults(func=cmd_sae_info)

    r = sub.add_parser("run", help="the whole study on one config: corpus -> ... -> report", parents=[common])
    r.add_argument("config", help="run config YAML, e.g. configs/smollm2-135m.yaml")
    r.add_argument("--out", required=True, help="run directory (rerun to resume)")
    r.set_defaults(func=cmd_run)

    a = sub.add_parser("activations", help="pool residual activations of the corpus at the layer", parents=[common])
    a.add_argument("config")
    a.add_argument("--out", required=True, help="run directory")
    a.set_defaults(func=cmd_activations)

    d = sub.add_parser("directions", help="build or evaluate emotion directions", parents=[common])
    dsub = d.add_subparsers(dest="directions_command", required=True)
    for name, text in (("build", "build directions from the train split"),
                       ("eval", "build, then evaluate: geometry, detection, EmoBank")):
        x = dsub.add_parser(name, help=text, parents=[common])
        x.add_argument("config")
        x.add_argument("--out", required=True, help="run directory")
        x.add_argument("--recipe", default="dense", choices=["dense", "sae"], help="'dense' (DiffMean) or 'sae'")
        x.set_defaults(func=cmd_directions)

    sc = sub.add_parser("score", help="score every SAE latent against the corpus (per emotion)", parents=[common])
    sc.add_argument("config")
    sc.add_argument("--out", required=True, help="run directory")
    sc.add_argument("--emotions", help="comma-separated emotions to print the top latents of")
    sc.add_argument("--top", type=int, default=5)
    sc.set_defaults(func=cmd_score)

    g = sub.add_parser("geometry", help="PCA of saved directions vs valence/arousal, with plots", parents=[common])
    g.add_argument("directions", help="a directions directory (RUN/directions/dense)")
    g.add_argument("--out", help="where to write geometry.png/html (default: the directions directory)")
    g.set_defaults(func=cmd_geometry)

    w = sub.add_parser("sweep", help="dense directions at several layers: one table to pick the layer",
                       parents=[common])
    w.add_argument("config")
    w.add_argument("--layers", required=True, help="comma-separated, e.g. 8,12,16,20,24")
    w.add_argument("--out", required=True, help="sweep directory (activation shards are cached there)")
    w.set_defaults(func=cmd_sweep)

    st = sub.add_parser("steer", help="generate with emotion steering: directions added or SAE latents clamped",
                        parents=[common])
    st.add_argument("--config", help="run config YAML (model, sae, steering.spec)")
    st.add_argument("--directions", help="directions directory (RUN/directions/dense); needed for --emotion")
    st.add_argument("--sae", help="SAE directory for clamping (default: the config's / shipped SAE)")
    st.add_argument("--emotion", action="append", metavar="NAME=S",
                    help="emotion and strength (x residual norm), repeatable: --emotion desperate=0.5")
    st.add_argument("--latent", action="append", metavar="ID=V", help="SAE latent and value, repeatable")
    st.add_argument("--method", choices=["direction", "clamp"], help="add directions or clamp SAE latents")
    st.add_argument("--op", choices=["set", "add", "scale"], help="how latent values apply")
    st.add_argument("--positions", choices=["all", "prompt", "generated"], help="token positions steered")
    st.add_argument("--hook", help="TransformerLens hook name (default: the directions' or SAE's)")
    st.add_argument("--prompt", action="append", help="chat message to reply to, repeatable")
    st.add_argument("--max-new-tokens", type=int, default=64)
    st.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--backend", choices=["hf", "tl"], default="hf", help="hf: fast; tl: TransformerLens reference")
    st.add_argument("--no-compare", action="store_true", help="skip the unsteered replies")
    st.set_defaults(func=cmd_steer)
    add_browse_parsers(sub, common)  # latents, latent: read-only views of a finished run
    return p


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; bad input (`UserError`, a missing or unreadable file) prints one line
    and exits 2, any other failure one line and exits 1; ``--debug`` re-raises with the traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s {rank_tag()}%(levelname)s %(name)s: %(message)s")
    try:
        args.func(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; rerun the same command to resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except RankFailure as e:  # another rank's error (or lost contact), named in one line
        print(f"error: {rank_tag()}{_one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None
    except (UserError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {_one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {_one_line(e)} (unexpected; rerun with --debug for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    if isinstance(e, OSError) and e.filename and str(e.filename) not in text:
        text = f"{e.filename}: {text}"
    return text


if __name__ == "__main__":
    main()
