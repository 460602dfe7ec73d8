"""The `saefeatures` command line: the parser, and thin calls into the library (`study.commands`).

Every subcommand checks its config, files and arguments (`study.preflight`) before the
model loads; bad input ends in one line, ``error: ...``, and exit status 2 (``--debug``: the
traceback). This module imports only the standard library and `errors`: the commands, and torch
with them, load once the arguments have parsed, so ``--help`` and argument errors come back at once.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UserError, one_line
from .browse import add_parsers as add_browse_parsers


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
    b.set_defaults(command_fn="cmd_corpus_build")
    for name, func, text in (("stats", "cmd_corpus_stats", "counts per emotion, split, filter"),
                             ("validate", "cmd_corpus_validate", "strict check of every line")):
        s = csub.add_parser(name, help=text, parents=[common])
        s.add_argument("path", nargs="?", help="corpus JSONL(.gz); default: the shipped corpus")
        if name == "stats":
            s.add_argument("--skip-corrupt", action="store_true")
        s.set_defaults(command_fn=func)
    au = csub.add_parser("audit", help="model-free check: a bag-of-words classifier, train topics -> test topics")
    au.add_argument("--corpus", help="corpus JSONL(.gz); default: the shipped corpus")
    au.set_defaults(command_fn="cmd_corpus_audit")
    im = csub.add_parser("import", help="write an external story set (emotion/topic/text JSONL) as a corpus")
    im.add_argument("src", help="a JSONL(.gz) story file or a directory of them (e.g. emotion-vector-bench/stories)")
    im.add_argument("--out", required=True, help="corpus file to write (.jsonl or .jsonl.gz)")
    im.add_argument("--model-id", default="unknown", help="the model that wrote the stories (recorded per record)")
    im.add_argument("--drop-unknown", action="store_true",
                    help="leave out stories of emotions outside the paper's 171 instead of failing")
    im.set_defaults(command_fn="cmd_corpus_import")

    sae = sub.add_parser("sae", help="train, evaluate and inspect the SAE at the studied layer", parents=[common])
    ssub = sae.add_subparsers(dest="sae_command", required=True)
    t = ssub.add_parser("train", help="train an SAE (or several: --layers, --widths) with SAELens on the corpus "
                        "(resumable)", parents=[common])
    t.add_argument("--config", help="run config YAML (model, corpus, tracking, sae.train)")
    t.add_argument("--out", help="output directory (default: sae.train.out or runs/sae/<model>-L<layer>; with "
                   "--layers or --widths, sae.train.out or runs/sae/<model>, holding L<layer>-W<width>/ per SAE "
                   "and summary.json)")
    t.add_argument("--layers", nargs="+", metavar="L", help="train an SAE at each layer (default: model.layer); "
                   "with --widths, one per (width, layer); under torchrun the SAEs are dealt to the ranks")
    t.add_argument("--widths", nargs="+", metavar="W", help="train an SAE of each width (default: sae.train.width)")
    t.add_argument("--tokens", type=int, help="override sae.train.training_tokens")
    t.add_argument("--device", help="override model.device (e.g. cuda; under torchrun each rank takes cuda:LOCAL_RANK)")
    t.add_argument("--no-resume", action="store_true", help="start over instead of resuming")
    t.add_argument("--ship", help="also export the trained SAE here (bfloat16 weights; with --layers or --widths, "
                   "SHIP/L<layer>-W<width>)")
    t.set_defaults(command_fn="cmd_sae_train", precheck=_sae_train_args)
    e = ssub.add_parser("eval", help="SAELens evals on the held-out corpus split", parents=[common])
    e.add_argument("--config", help="run config YAML (model, corpus, sae)")
    e.add_argument("--sae", help="SAE directory (default: the config's SAE)")
    e.add_argument("--split", help="corpus split (default: sae.eval.split, 'test')")
    e.add_argument("--max-tokens", type=int, help="tokens for explained variance, L0, dead latents")
    e.add_argument("--ce-tokens", type=int, help="tokens for the CE loss recovered")
    e.add_argument("--save", help="write the evals to this JSON file")
    e.set_defaults(command_fn="cmd_sae_eval")
    i = ssub.add_parser("info", help="an SAE directory's config, training record and evals", parents=[common])
    i.add_argument("path", nargs="?", help="SAE directory (default: the config's or the shipped SAE)")
    i.add_argument("--config", help="run config YAML")
    i.set_defaults(command_fn="cmd_sae_info")

    r = sub.add_parser("run", help="the whole study on one config: corpus -> ... -> report", parents=[common])
    r.add_argument("config", help="run config YAML, e.g. configs/smollm2-135m.yaml")
    r.add_argument("--out", required=True, help="run directory (rerun to resume)")
    r.set_defaults(command_fn="cmd_run")

    a = sub.add_parser("activations", help="pool residual activations of the corpus at the layer", parents=[common])
    a.add_argument("config")
    a.add_argument("--out", required=True, help="run directory")
    a.set_defaults(command_fn="cmd_activations")

    d = sub.add_parser("directions", help="build or evaluate emotion directions", parents=[common])
    dsub = d.add_subparsers(dest="directions_command", required=True)
    for name, text in (("build", "build directions from the train split"),
                       ("eval", "build, then evaluate: geometry, detection, EmoBank")):
        x = dsub.add_parser(name, help=text, parents=[common])
        x.add_argument("config")
        x.add_argument("--out", required=True, help="run directory")
        x.add_argument("--recipe", default="dense", choices=["dense", "sae"], help="'dense' (DiffMean) or 'sae'")
        x.set_defaults(command_fn="cmd_directions")

    sc = sub.add_parser("score", help="score every SAE latent against the corpus (per emotion)", parents=[common])
    sc.add_argument("config")
    sc.add_argument("--out", required=True, help="run directory")
    sc.add_argument("--emotions", help="comma-separated emotions to print the top latents of")
    sc.add_argument("--top", type=int, default=5)
    sc.set_defaults(command_fn="cmd_score")

    g = sub.add_parser("geometry", help="PCA of saved directions vs valence/arousal, with plots", parents=[common])
    g.add_argument("directions", help="a directions directory (RUN/directions/dense)")
    g.add_argument("--out", help="where to write geometry.png/html (default: the directions directory)")
    g.set_defaults(command_fn="cmd_geometry")

    w = sub.add_parser("sweep", help="dense directions at several layers: one table to pick the layer",
                       parents=[common])
    w.add_argument("config")
    w.add_argument("--layers", required=True, help="comma-separated, e.g. 8,12,16,20,24")
    w.add_argument("--out", required=True, help="sweep directory (activation shards are cached there)")
    w.set_defaults(command_fn="cmd_sweep")

    st = sub.add_parser("steer", help="generate with emotion steering: directions added or SAE latents clamped",
                        parents=[common])
    st.add_argument("--config", help="run config YAML (model, sae, steering.spec)")
    st.add_argument("--directions", help="directions directory (RUN/directions/dense); needed for --emotion")
    st.add_argument("--sae", help="SAE directory for clamping (default: the config's, else the shipped SAE)")
    st.add_argument("--emotion", action="append", metavar="NAME=S",
                    help="emotion and strength (x residual norm), repeatable: --emotion desperate=0.5")
    st.add_argument("--latent", action="append", metavar="ID=V", help="SAE latent and value, repeatable")
    st.add_argument("--method", help="how --emotion applies: 'direction' (add, the default) or 'clamp' (its SAE "
                    "latents); --latent alone is a clamp")
    st.add_argument("--op", help="how latent values apply: 'set' (default), 'add' or 'scale'")
    st.add_argument("--positions", help="token positions steered: 'all' (default), 'prompt' or 'generated'")
    st.add_argument("--hook", help="TransformerLens hook name (default: the directions' or SAE's)")
    st.add_argument("--prompt", action="append", help="chat message to reply to, repeatable")
    st.add_argument("--max-new-tokens", type=int, default=64)
    st.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    st.add_argument("--seed", type=int, default=0)
    st.add_argument("--backend", choices=["hf", "tl"], default="hf", help="hf: fast; tl: TransformerLens reference")
    st.add_argument("--no-compare", action="store_true", help="skip the unsteered replies")
    st.set_defaults(command_fn="cmd_steer", precheck=_steer_args)

    rd = sub.add_parser("read", help="calibrated emotion scores of texts, read by a run's directions (read-only)",
                        parents=[common])
    rd.add_argument("texts", nargs="+", metavar="TEXT", help="texts to read, each pooled as the directions were built")
    _source(rd)
    rd.add_argument("--top", type=int, default=3, help="top emotions shown per text")
    rd.add_argument("--raw", action="store_true", help="raw projections instead of z-scores against neutral text")
    rd.add_argument("--json", action="store_true", help="machine-readable output: every score of every text")
    rd.set_defaults(command_fn="cmd_read", precheck=_source_exists)

    mo = sub.add_parser("monitor", help="per-token emotion trace of a chat, as HTML (read-only on the run)",
                        parents=[common])
    mo.add_argument("chat", help='JSON file: a list of {"role": "system"|"user"|"assistant", "content": "..."}')
    _source(mo)
    mo.add_argument("--out", required=True, help="HTML file to write (outside the run directory)")
    mo.add_argument("--emotions", help="comma-separated emotions to show (default: the run's monitor.emotions)")
    mo.set_defaults(command_fn="cmd_monitor", precheck=_monitor_args)

    rp = sub.add_parser("report", help="rebuild a finished run's report.html from its files (nothing recomputed)",
                        parents=[common])
    rp.add_argument("run", help="run directory")
    rp.add_argument("--out", help="HTML file to write instead of RUN/report.html")
    rp.set_defaults(command_fn="cmd_report", precheck=_run_exists)
    add_browse_parsers(sub, common)  # latents, latent: read-only views of a finished run
    return p


def _source(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", help="finished run directory: its dense (and SAE) directions, model and neutral texts")
    p.add_argument("--directions", help="a directions directory instead (e.g. RUN/directions/dense)")


def _steer_args(args: argparse.Namespace) -> None:
    if args.emotion and not args.directions:
        raise UserError("--emotion needs --directions DIR (e.g. RUN/directions/dense): each emotion's direction "
                        "(or, with --method clamp, its SAE latents) comes from there.")


def _sae_train_args(args: argparse.Namespace) -> None:
    for flag, example in (("layers", "10 20"), ("widths", "4608 9216")):
        numbers = []
        for value in getattr(args, flag) or []:
            try:
                numbers.append(int(value))
            except ValueError:
                raise UserError(f"--{flag} {value}: expected whole numbers, e.g. --{flag} {example}.") from None
        if numbers:
            setattr(args, flag, numbers)


def _run_exists(args: argparse.Namespace) -> None:
    if not (Path(args.run) / "manifest.json").is_file():
        raise UserError(f"{args.run} is not a run directory (no manifest.json): give the --out of a finished "
                        "`saefeatures run`.")


def _source_exists(args: argparse.Namespace) -> None:
    if bool(args.run) == bool(args.directions):
        raise UserError("give either --run RUN (a finished run) or --directions DIR (a directions directory).")
    if args.run:
        _run_exists(args)
    elif not (Path(args.directions) / "directions.json").is_file():
        raise UserError(f"{args.directions} holds no directions.json: give a directory written by "
                        "EmotionDirections.save (e.g. RUN/directions/dense).")


def _monitor_args(args: argparse.Namespace) -> None:
    _source_exists(args)
    if not Path(args.chat).is_file():
        raise UserError(f"{args.chat}: no such chat file; write a JSON list of {{\"role\", \"content\"}} messages.")
    if args.run and Path(args.out).resolve().is_relative_to(Path(args.run).resolve()):
        raise UserError(f"--out {args.out} is inside the run directory, which monitor leaves as it is: "
                        "write the trace elsewhere.")


def main(argv: list[str] | None = None) -> None:
    """Run one subcommand; bad input (`UserError`, a missing or unreadable file) prints one line
    and exits 2, any other failure one line and exits 1; ``--debug`` re-raises with the traceback."""
    args = build_parser().parse_args(argv)
    try:
        if getattr(args, "precheck", None):
            args.precheck(args)
        from . import commands  # torch and the library: only now that the arguments are good

        commands.run(args)
    except KeyboardInterrupt:
        if args.debug:
            raise
        print("error: interrupted; rerun the same command to resume.", file=sys.stderr)
        raise SystemExit(130) from None
    except (UserError, OSError) as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        raise SystemExit(2) from None
    except Exception as e:  # noqa: BLE001 - a bug: one line here, the traceback with --debug
        if args.debug:
            raise
        print(f"error: {type(e).__name__}: {one_line(e)} (unexpected; rerun with --debug for the traceback)",
              file=sys.stderr)
        raise SystemExit(1) from None


if __name__ == "__main__":
    main()
