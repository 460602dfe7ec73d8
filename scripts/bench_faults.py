"""Fault benchmark of `saefeatures run`: interruptions, a second run on one --out, unwritable and
corrupted run directories, on a small config built in a temp dir.

    python scripts/bench_faults.py [--emotions 4] [--at 0.5] [--parallel] [--stages scoring,...]
        [--keep DIR [--reuse-base [--config CFG]]]

After one uninterrupted run (and a no-op rerun of it), for each long stage (the scoring pass,
EmoBank pooling, steering) a copy of the finished run has that stage's outputs removed, so a
run has exactly it left to compute; it is interrupted with SIGINT and with SIGKILL when the
stage is ``--at`` (a fraction) of its uninterrupted duration in (its start is read from
manifest.json, which marks a stage not done when it starts), then rerun. Reported: which stages
the rerun skipped and recomputed, whether its metrics equal the uninterrupted run's (timings
left out; max abs difference of the numbers) and the time lost: interrupted run + rerun -
(no-op rerun + the stage's uninterrupted seconds). Then: a second run on the same --out while
the first holds it (its error line); a read-only and a full --out (as root: immutable directory
and a 16 KiB tmpfs; otherwise chmod and no 'full' case); truncated artifacts (an activations
shard, a directions file, a JSON file) in a copy of the finished run. Prints one table.
``--parallel`` runs the three stages' cases at once (on a shared machine, for a share of the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EMOTIONS = ("happy", "sad", "afraid", "calm", "angry", "grateful", "proud", "desperate")


def write_config(root: Path, n_emotions: int) -> Path:
    from saefeatures.corpus import load_corpus

    records = load_corpus()
    keep = set(EMOTIONS[:n_emotions])
    small = [r for r in records if r.emotion in keep] + [r for r in records if r.emotion == "neutral"][::10]
    corpus = root / "corpus.jsonl"
    corpus.write_text("".join(r.to_json() + "\n" for r in small))
    cfg = {
        "corpus": {"path": str(corpus)},
        "activations": {"shard_records": 64},
        "scoring": {"warmup_records": 16},
        "evals": {"emobank_limit": 200},
        "sae": {"eval": {"max_tokens": 2048, "ce_tokens": 512}},
        "sae_directions": {"recipe": {"ks": [1, 4]}, "main_k": 4, "output_candidates": 4,
                           "cards_per_emotion": 1, "card_snippets": 2},
        "monitor": {"calibration_texts": 8, "emotions": ["afraid", "calm"]},
        "steering": {"emotions": ["happy", "afraid"], "strengths": [0.0, 0.2], "samples_per_prompt": 1,
                     "max_new_tokens": 12, "preference": False, "pressure": False,
                     "prompts": ["Tell me about your day.", "Describe your street."]},
        "tracking": {"wandb": False},
    }
    path = root / "config.yaml"
    path.write_text(json.dumps(cfg, indent=1))
    print(f"config: {len(small)} records ({n_emotions} emotions + neutral), {path}", flush=True)
    return path


def _default_sigint() -> None:
    # a shell's background job ignores SIGINT, and a Python started so never raises KeyboardInterrupt
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(cfg: Path, out: Path, log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "saefeatures", "run", str(cfg), "--out", str(out)], cwd=ROOT,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, preexec_fn=_default_sigint)


def run(cfg: Path, out: Path, log: Path) -> tuple[int, float]:
    t0 = time.perf_counter()
    rc = start(cfg, out, log).wait()
    return rc, time.perf_counter() - t0


def manifest(out: Path) -> dict:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def metrics(out: Path) -> dict:
    m = json.loads((out / "metrics.json").read_text())
    m.pop("timings", None)
    return m


def max_diff(a, b) -> float:
    """Largest abs difference of the numbers in two nested objects; inf if their shapes differ."""
    if isinstance(a, dict) and isinstance(b, dict):
        if a.keys() != b.keys():
            return float("inf")
        return max((max_diff(a[k], b[k]) for k in a), default=0.0)
    if isinstance(a, list) and isinstance(b, list):
        return float("inf") if len(a) != len(b) else max((max_diff(x, y) for x, y in zip(a, b)), default=0.0)
    if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
        return abs(float(a) - float(b)) if a == a or b == b else 0.0
    return 0.0 if a == b else float("inf")


def last_error_line(log: Path) -> str:
    lines = [ln for ln in log.read_text().splitlines() if ln.strip()]
    return lines[-1] if lines else ""


# what to delete from a copy of the finished run so that a rerun has exactly this stage left to compute
REDO = {"scoring": (["scores/scores.json", "scores/scores.safetensors", "activations/corpus-*"],
                    ["scoring", "activations"]),
        "emobank_activations": (["activations/emobank-*"], ["emobank_activations"]),
        "steering": (["steering/results.json"], ["steering"])}


def prepared(base_out: Path, out: Path, stage: str) -> Path:
    """A copy of the finished run with ``stage``'s outputs and manifest entries removed."""
    shutil.copytree(base_out, out)
    globs, stages = REDO[stage]
    for pattern in globs:
        for q in out.glob(pattern):
            shutil.rmtree(q) if q.is_dir() else q.unlink()
    m = manifest(out)
    for name in stages:
        m["stages"].pop(name)
    (out / "manifest.json").write_text(json.dumps(m))
    return out


def interrupted(cfg: Path, root: Path, base_out: Path, stage: str, sig: signal.Signals, delay: float, base: dict,
                t_ref: float) -> list:
    out = prepared(base_out, root / f"{stage}-{sig.name}", stage)
    t0 = time.perf_counter()
    proc = start(cfg, out, root / f"{out.name}.log")
    while proc.poll() is None:
        entry = manifest(out).get("stages", {}).get(stage)
        if entry is not None and not entry.get("done"):
            break
        time.sleep(0.1)
    time.sleep(delay)
    still = manifest(out).get("stages", {}).get(stage, {}).get("done") is False
    if proc.poll() is None:
        proc.send_signal(sig)
    rc = proc.wait()
    t_first = time.perf_counter() - t0
    rc2, t_rerun = run(cfg, out, root / f"{out.name}.rerun.log")
    last = manifest(out).get("last_run", {})
    diff = max_diff(metrics(out), base) if rc2 == 0 else float("nan")
    note = "" if still else " (stage ended before the signal)"
    return [f"{sig.name} in {stage}", f"{delay:.0f}s into the stage{note}", rc, rc2,
            ", ".join(last.get("recomputed", [])), len(last.get("skipped", [])), f"{diff:.1e}",
            f"{t_first + t_rerun - t_ref:+.0f}s"]


def make_unwritable(path: Path) -> str:
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
        return "chattr +i"
    return "chmod 555"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--emotions", type=int, default=4, help="emotions in the small corpus")
    p.add_argument("--at", type=float, default=0.5,
                   help="signal this fraction of the stage's uninterrupted duration after it starts")
    p.add_argument("--keep", type=Path, help="work here (kept) instead of a temp dir")
    p.add_argument("--parallel", action="store_true",
                   help="interrupt the three stages' runs at the same time (faster, noisier times)")
    p.add_argument("--config", type=Path, help="with --reuse-base: the config to run (default: DIR/config.yaml)")
    p.add_argument("--stages", default=",".join(REDO), help="stages to interrupt, comma-separated")
    p.add_argument("--reuse-base", action="store_true", help="with --keep: reuse its finished uninterrupted run")
    args = p.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="bench_faults."))
    root.mkdir(parents=True, exist_ok=True)
    print(f"python scripts/bench_faults.py --emotions {args.emotions} --at {args.at}  (work dir {root})")
    if args.reuse_base and (args.config or root / "config.yaml").is_file():
        cfg = args.config or root / "config.yaml"
    else:
        cfg = write_config(root, args.emotions)
    rows: list[list] = []

    def add(row: list) -> None:
        rows.append(row)
        print(" | ".join(str(x) for x in row), flush=True)

    base_out = root / "base"
    if args.reuse_base and manifest(base_out).get("last_run"):  # from an earlier invocation
        rc, t_base = 0, sum(v.get("seconds", 0.0) for v in manifest(base_out)["stages"].values())
    else:
        rc, t_base = run(cfg, base_out, root / "base.log")
        assert rc == 0, last_error_line(root / "base.log")
    base = metrics(base_out)
    seconds = manifest(base_out)["stages"]
    print(f"uninterrupted run: {t_base:.0f}s; stage seconds: "
          + ", ".join(f"{k} {v.get('seconds', 0):.0f}" for k, v in seconds.items() if v.get("seconds", 0) >= 1),
          flush=True)
    add(["uninterrupted", "", rc, "", "", "", "", f"{t_base:.0f}s total"])

    rc, t_noop = run(cfg, base_out, root / "noop.log")
    last = manifest(base_out)["last_run"]
    add(["no-op rerun", "", rc, "", ", ".join(last["recomputed"]) or "none", len(last["skipped"]),
         f"{max_diff(metrics(base_out), base):.1e}", f"{t_noop:.0f}s total"])

    seconds = manifest(base_out)["stages"]

    def cases(stage: str) -> list[list]:
        # reference: the no-op rerun plus the stage's time in the uninterrupted run
        t_ref = t_noop + seconds[stage]["seconds"]
        return [interrupted(cfg, root, base_out, stage, sig, args.at * seconds[stage]["seconds"], base, t_ref)
                for sig in (signal.SIGINT, signal.SIGKILL)]

    # one thread per stage with ``--parallel`` (the cases of different stages, and the checks
    # below, run at once); otherwise the checks below first, then the stages one by one
    stages = args.stages.split(",")
    pool = ThreadPoolExecutor(len(stages) if args.parallel else 1)
    pending = [pool.submit(cases, stage) for stage in stages] if args.parallel else []

    # a second run on the same --out while the first holds the lock
    out = root / "concurrent"
    first = start(cfg, out, root / "concurrent-1.log")
    while first.poll() is None and "model" not in manifest(out).get("stages", {}):
        time.sleep(0.2)
    rc2, t2 = run(cfg, out, root / "concurrent-2.log")
    first.send_signal(signal.SIGKILL)
    first.wait()
    add(["second run, same --out", f"{t2:.1f}s to fail", rc2, "",
         last_error_line(root / "concurrent-2.log").split(": ", 1)[-1], "", "", ""])

    # read-only --out
    ro = root / "readonly"
    ro.mkdir()
    how = make_unwritable(ro)
    rc, t = run(cfg, ro / "run", root / "readonly.log")
    add([f"read-only --out ({how})", f"{t:.1f}s to fail", rc, "",
         last_error_line(root / "readonly.log").split(": ", 1)[-1], "", "", ""])
    subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
    ro.chmod(0o755)

    # full --out: a 16 KiB tmpfs (root only)
    full = root / "full"
    full.mkdir()
    if os.geteuid() == 0 and subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(full)],
                                            capture_output=True).returncode == 0:
        try:
            rc, t = run(cfg, full / "run", root / "full.log")
            temps = [str(q.relative_to(full)) for q in full.rglob("*.tmp")]
            add(["full --out (16 KiB tmpfs)", f"{t:.0f}s to fail", rc, "",
                 last_error_line(root / "full.log").split(": ", 1)[-1] + f" [temp files left: {len(temps)}]",
                 "", "", ""])
        finally:
            subprocess.run(["umount", str(full)], capture_output=True)
    else:
        add(["full --out", "skipped: needs root to mount a small tmpfs", "", "", "", "", "", ""])

    # truncated artifacts in a copy of the finished run
    out = root / "truncated"
    shutil.copytree(base_out, out)
    victims = [sorted(out.glob("activations/corpus-*/shard-*.safetensors"))[0],
               out / "directions" / "dense" / "directions.safetensors", out / "figures" / "dense" / "detection.json"]
    for v in victims:
        v.write_bytes(v.read_bytes()[: max(8, v.stat().st_size // 3)])
    rc, t = run(cfg, out, root / "truncated.log")
    named = sum(f"{v} is corrupt" in (root / "truncated.log").read_text() for v in victims)
    last = manifest(out).get("last_run", {})
    add([f"truncated: shard, directions, detection.json ({named}/3 named)", "", rc, "",
         ", ".join(last.get("recomputed", [])), len(last.get("skipped", [])),
         f"{max_diff(metrics(out), base):.1e}", f"{t:.0f}s total"])

    if not pending:
        pending = [pool.submit(cases, stage) for stage in stages]
    for job in pending:
        for row in job.result():
            add(row)
    pool.shutdown()

    head = ["case", "signal at / note", "rc", "rerun rc", "rerun recomputed (or error line)", "rerun skipped",
            "max |metrics - uninterrupted|", "time lost"]
    print("\n| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        print("| " + " | ".join(str(x) for x in r) + " |")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
