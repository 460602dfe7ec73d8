"""What each `saefeatures` subcommand does: thin calls into the library (the parser, and the checks
of arguments that need no library, are in `study.cli`, which imports this module only once the
arguments parse, so help and argument errors come back at once).

Every command checks its config, files and arguments (`study.preflight`) before the model loads.
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
from ..corpus_build import build_corpus, compress, done_batches, load_steer_directions
from ..corpus_import import import_corpus
from ..directions import EmotionDirections
from ..distributed import RankFailure, joined, rank_tag
from ..errors import UserError, one_line
from ..files import write_json, write_text
from ..generation import Generator
from ..geometry import analyze
from ..models import load_hf, load_model, resolve_dtype, resolve_layer
from ..monitor import Calibration, alarms, load_chat, trace_chat
from ..neutral import NEUTRAL_PROMPTS
from ..report.geometry import save_plots
from ..report.monitor import trace_page
from ..report.page import build_report
from ..sae import load_sae, sae_info, shipped_sae_dir
from ..steering import parse_assignments, steer_prompts
from .config import RunConfig, load_config
from .layer_sweep import format_table, sweep_layers
from .pipeline import open_study, run_study
from .preflight import (check_corpus, check_model, check_sae_config, check_steer, check_training_corpus,
                        check_values)
from .reading import FinishedRun, format_readings, read_texts
from .sae_stages import evaluate_run_sae, stage_concept_scores, stage_sae, stage_sae_directions, stage_scores
from .sae_variants import plan_variants, train_variants, variants_dir, variants_summary
from .stages import eval_data, report_directions, stage_activations, stage_concepts, stage_dense, stage_emobank

log = logging.getLogger("saefeatures")


def run(args: argparse.Namespace) -> None:
    """Configure logging (rank-tagged under torchrun) and run the subcommand ``args`` names;
    another rank's failure (or lost contact) is one line and exit status 1."""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s {rank_tag()}%(levelname)s %(name)s: %(message)s")
    command = getattr(args, "func", None) or globals()[args.command_fn]
    try:
        command(args)
    except RankFailure as e:
        print(f"error: {rank_tag()}{one_line(e)}", file=sys.stderr)
        raise SystemExit(1) from None


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
    load_steer_directions(build)  # missing or incomplete steering directions fail here, not after loading
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
    variants = plan_variants(cfg, args.layers, args.widths, args.out, args.ship)
    with joined() as world:  # under torchrun the variants are dealt to the ranks
        records = train_variants(cfg, variants, world, resume=not args.no_resume)
    if not world.leader:
        return
    if args.layers is None and args.widths is None:  # the config's one SAE
        _print(records[0])
        return
    summary = variants_summary(records)
    write_json(variants_dir(cfg, args.out) / "summary.json", summary)
    _print(summary)


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
    if args.recipe == "sae":  # scoring first: its forward passes also pool the train split and concept sentences
        sae = stage_sae(study)
        scores = stage_scores(study, sae)
        stage_concept_scores(study, sae)
    acts = stage_activations(study)
    evaluate = args.directions_command == "eval"
    data = eval_data(study, acts, stage_emobank(study)) if evaluate else None
    dense = stage_dense(study, acts, stage_concepts(study))
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
        if spec.latents and not spec.emotions and args.method is None:
            spec = replace(spec, method="clamp")  # latents alone: a clamp, as the printed spec says
    for key in ("method", "op", "positions", "hook"):
        if getattr(args, key) is not None:
            spec = replace(spec, **{key: getattr(args, key)})
    dirs = EmotionDirections.load(args.directions) if args.directions else None
    layer, needs_sae = check_steer(cfg, spec, dirs, args.directions, args.sae)
    sae_spec = None
    if needs_sae:  # --sae, the config's SAE, or the SAE shipped for the model and layer
        sae_spec = args.sae or (replace(cfg.sae, path=str(shipped_sae_dir(cfg.model.name, layer)))
                                if cfg.sae.source == "local" and cfg.sae.path is None else cfg.sae)
    model = load_model(cfg.model.name, dtype=cfg.model.dtype, device=cfg.model.device)
    sae = load_sae(sae_spec, model, layer=layer) if needs_sae else None
    rows = steer_prompts(model, spec, args.prompt or NEUTRAL_PROMPTS[:2], directions=dirs, sae=sae,
                         compare=not args.no_compare, max_new_tokens=args.max_new_tokens,
                         temperature=args.temperature, seed=args.seed, backend=args.backend)
    _print({"spec": spec.to_dict(), "applies": spec.summary(),
            **({"sae": getattr(sae_spec, "path", sae_spec)} if needs_sae else {}), "replies": rows})


def _reading_source(args: argparse.Namespace, calibrated: bool
                    ) -> tuple[FinishedRun | None, dict[str, EmotionDirections]]:
    """The run (or None) and the direction sets `read` and `monitor` use, checked before any model
    loads; ``calibrated``: each set will need a neutral sample."""
    if args.run:
        run = FinishedRun.open(args.run)
        sets = run.direction_sets()
        if calibrated and run.needs_neutral(sets):
            run.neutral_texts()  # a missing corpus fails now, not after the model loads
        return run, sets
    dirs = EmotionDirections.load(args.directions)
    if calibrated and dirs.neutral is None:
        raise UserError(f"The directions at {args.directions} carry no neutral sample to calibrate against (saved "
                        "before it was recorded): give --run RUN (its neutral texts calibrate them), or --raw.")
    return None, {dirs.recipe: dirs}


def _model_for(run: FinishedRun | None, sets: dict[str, EmotionDirections]):
    if run is not None:
        return run.load_model()
    name = next(iter(sets.values())).metadata.get("model") or RunConfig().model.name
    return load_model(name)


def cmd_read(args: argparse.Namespace) -> None:
    run, sets = _reading_source(args, calibrated=not args.raw)
    model = _model_for(run, sets)
    neutral = None
    if run is not None and not args.raw:
        if run.corpus_file.is_file():
            neutral = run.neutral_texts()
        else:  # the directions' own neutral samples (present: `_reading_source` checked), from whole texts
            log.warning("the run's corpus %s is gone: calibrating on the directions' neutral sample, not on "
                        "neutral text of each text's length", run.corpus_file)
    rows = read_texts(model, sets, args.texts, top=args.top, raw=args.raw, neutral_texts=neutral)
    unit = "raw projection" if args.raw else "z vs neutral text"
    if args.json:
        calibration = None if args.raw else ("neutral texts of the run's corpus, cut to each text's length"
                                             if neutral else "the directions' neutral sample")
        _print({"unit": unit, "calibration": calibration, "texts": rows})
    else:
        print(format_readings(rows, list(sets), unit if neutral is None else "z vs neutral text of its length"))


def cmd_monitor(args: argparse.Namespace) -> None:
    messages = load_chat(args.chat)
    run, sets = _reading_source(args, calibrated=False)  # the monitor's calibration is per token
    dense = sets.get("dense") or next(iter(sets.values()))
    emotions = args.emotions.split(",") if args.emotions else (run.cfg if run else RunConfig()).monitor.emotions
    missing = [e for e in emotions if e not in dense.names]
    if missing:
        raise UserError(f"{', '.join(missing)} not in the directions ({', '.join(dense.names[:12])}...): "
                        "choose --emotions among them.")
    calib_file = Path(args.directions or "") / "calibration.json"
    model = _model_for(run, sets)
    calib = run.monitor_calibration(model, dense) if run else \
        Calibration.load(calib_file) if calib_file.is_file() else None
    trace = trace_chat(model, dense, messages)
    found = alarms(trace, calib, emotions) if calib is not None else []
    notes = [f"{dense.recipe} directions at layer {dense.layer}; values are "
             + ("z-scores against neutral text." if calib else "raw projections (no calibration.json found).")]
    notes += [f"alarm: {a.emotion} at tokens {a.start}-{a.end} ({a.role}), peak z {a.peak_z:.1f}" for a in found]
    write_text(args.out, trace_page(trace, emotions, calib, title=f"Monitor: {args.chat}", notes=notes))
    shown = replace(trace, projections=calib.z(trace)) if calib is not None else trace
    turns = [{**t, "mean": {n: round(v, 3) for n, v in t["mean"].items() if n in emotions}} for t in shown.turn_means()]
    _print({"out": str(args.out), "tokens": len(trace.tokens), "unit": "z vs neutral" if calib else "projection",
            "turns": turns, "alarms": [vars(a) for a in found]})


def cmd_report(args: argparse.Namespace) -> None:
    out = Path(args.out) if args.out else Path(args.run) / "report.html"
    write_text(out, build_report(args.run))
    _print({"report": str(out)})
