"""torch.distributed on CPU (gloo, one thread per rank, world size 2): the study on two ranks gives what
one process gives; a rank killed during the scoring pass loses nothing, and a rerun gives the same
result; a failing or hanging rank ends the others with an error naming it and the stage.

Ranks are spawned processes running the same entry point `torchrun` would (`init_world` from the
environment torchrun sets), on the stand-in model and a random SAE, so each study takes a minute.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import socket
import time
import traceback
import zlib
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_random_sae, standin_checkpoint
from saefeatures.distributed import World, close_world, init_world
from saefeatures.keys import flatten

TIMEOUT_S = 20
STUDY_EMOTIONS = ("happy", "sad", "afraid", "calm", "desperate")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rank_main(fn, rank: int, size: int, port: int, errors: str, args: tuple) -> None:
    """One rank, as torchrun starts it: its environment, then `init_world`; its error goes to a file."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1", SAEFEATURES_DIST_TIMEOUT=str(TIMEOUT_S))
    torch.set_num_threads(1)
    world = init_world()
    try:
        fn(world, *args)
    except BaseException as e:
        Path(errors, f"rank{rank}.err").write_text(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        close_world(world)


def spawn(fn, size: int, tmp: Path, *args, limit_s: float = 600) -> tuple[list[int | None], dict[int, str], float]:
    """Run ``fn(world, *args)`` on ``size`` ranks; (exit codes, {rank: error text}, seconds)."""
    errors = tmp / f"errors-{time.monotonic_ns()}"
    errors.mkdir(parents=True)
    ctx = mp.get_context("spawn")
    port = _free_port()
    t0 = time.perf_counter()
    procs = [ctx.Process(target=_rank_main, args=(fn, r, size, port, str(errors), args)) for r in range(size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(max(1.0, limit_s - (time.perf_counter() - t0)))
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    found = {int(f.stem[4:]): f.read_text() for f in errors.glob("rank*.err")}
    return [p.exitcode for p in procs], found, time.perf_counter() - t0


# ------------------------------------------------------------ the collectives

def _collectives(world: World, out: str) -> None:
    t = torch.tensor([float(world.rank + 1), 10.0 * world.rank])
    world.sync("sum")
    result = {"sum": world.all_reduce(t.clone(), "sum").tolist(),
              "max": world.all_reduce(t.clone(), "max", "max").tolist(),
              "min": world.all_reduce(t.clone(), "min", "min").tolist(),
              "mine": world.mine(list(range(5))), "payloads": world.sync("gather", payload={"r": world.rank}),
              "agreed": world.agree("agree", "from rank 0" if world.leader else "not this")}
    Path(out, f"rank{world.rank}.json").write_text(json.dumps(result))
    if world.rank == 1:
        world.run("scoring", _raise)
    else:
        world.run("scoring", lambda: None)


def _raise() -> None:
    raise ValueError("boom")


def test_collectives_and_a_failing_rank_named_on_every_rank(tmp_path):
    codes, errors, _ = spawn(_collectives, 2, tmp_path, str(tmp_path), limit_s=120)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert results[0]["sum"] == results[1]["sum"] == [3.0, 10.0]
    assert results[0]["max"] == [2.0, 10.0] and results[0]["min"] == [1.0, 0.0]
    assert results[0]["mine"] == [0, 2, 4] and results[1]["mine"] == [1, 3]
    assert results[1]["payloads"] == [{"r": 0}, {"r": 1}] and results[1]["agreed"] == "from rank 0"
    assert codes == [1, 1]
    assert errors[1].startswith("ValueError: boom")  # the failed rank raises its own error
    assert errors[0].startswith("RankFailure: rank 1 of 2 failed in stage 'scoring': ValueError: boom")


def _hang(world: World) -> None:
    if world.rank == 1:
        time.sleep(TIMEOUT_S + 3)
        return
    world.sync("scoring")


def test_a_hanging_rank_ends_the_others_within_the_timeout(tmp_path):
    codes, errors, seconds = spawn(_hang, 2, tmp_path, limit_s=120)
    assert codes[0] == 1
    assert errors[0].startswith("RankFailure: rank 0 of 2: lost contact with the other ranks in stage 'scoring'")
    assert f"waited up to {TIMEOUT_S} s" in errors[0]


def test_the_single_process_world_needs_no_process_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    world = init_world()
    assert (world.rank, world.size, world.leader) == (0, 1, True)
    assert world.mine([1, 2, 3]) == [1, 2, 3] and world.sync("x", payload=5) == [5] and world.agree("x", 7) == 7
    with pytest.raises(ValueError, match="boom"):
        world.run("x", _raise)


def test_each_rank_computes_on_its_own_gpu():
    assert World(1, 2, local_rank=1).own_device("cuda") == "cuda:1"
    assert World(1, 2, local_rank=1).own_device("cuda:0") == "cuda:1"  # one GPU per rank on a node
    assert World(1, 2, local_rank=1).own_device("cpu") == "cpu" and World().own_device("cuda:2") == "cuda:2"


# ------------------------------------------------------------ the study

@pytest.fixture(scope="module")
def tiny_study(tmp_path_factory):
    """(config, root): the study on the stand-in model, a random TopK SAE and ~140 shipped records."""
    from saefeatures.corpus import load_corpus
    from saefeatures.study.config import RunConfig, from_dict

    root = tmp_path_factory.mktemp("dist")
    ckpt = standin_checkpoint(root / "model")
    make_random_sae(d_in=64, d_sae=32, hook="blocks.2.hook_resid_post", k=4).save_model(str(root / "sae"))
    records = load_corpus()
    small = [r for r in records if r.emotion in STUDY_EMOTIONS] + [r for r in records if r.emotion == "neutral"][::40]
    (root / "corpus.jsonl").write_text("".join(r.to_json() + "\n" for r in small))
    cfg = from_dict(RunConfig, {
        "model": {"name": str(ckpt), "layer": 2},
        "corpus": {"path": str(root / "corpus.jsonl")},
        "activations": {"layers": [1], "batch_tokens": 1024, "shard_records": 16},
        "scoring": {"warmup_records": 8},
        "sae": {"source": "local", "path": str(root / "sae"),
                "eval": {"max_tokens": 2048, "ce_tokens": 1024, "batch_size": 4}},
        "evals": {"emobank_limit": 20},
        "sae_directions": {"recipe": {"ks": [1, 2]}, "main_k": 2, "output_candidates": 2, "cards_per_emotion": 1,
                           "card_snippets": 1},
        "monitor": {"calibration_texts": 4},
        "steering": {"emotions": ["happy", "afraid", "calm"], "strengths": [0.0, 0.1], "samples_per_prompt": 1,
                     "max_new_tokens": 4, "preference": False, "prompts": ["Tell me about your day."]},
        "tracking": {"wandb": False},
    })
    return cfg, root


def _study(world: World, cfg, out: str, fault: str = "") -> None:
    """The study on this rank; ``fault`` ('kill' or 'raise') strikes rank 1 at its sixth forward pass of the scoring
    stage ('probes': at its first probe cell). The probe cells this rank runs are listed in OUT.probe-cells<rank>."""
    from saefeatures.evals import probes
    from saefeatures.sae import scoring
    from saefeatures.study.pipeline import run_study

    run_cell = probes.run_cell

    def listed(model, sets, probe_cfg, cell):
        if fault == "probes" and world.rank == 1:
            raise RuntimeError("injected fault")
        with open(f"{out}.probe-cells{world.rank}", "a") as f:
            f.write(json.dumps(cell) + "\n")
        return run_cell(model, sets, probe_cfg, cell)

    probes.run_cell = listed

    if fault in ("kill", "raise") and world.rank == 1:
        forward, calls = scoring.forward_hooks, []

        def failing(*args, **kwargs):
            calls.append(1)
            if len(calls) == 6:
                if fault == "kill":
                    os._exit(9)
                raise RuntimeError("injected fault")
            return forward(*args, **kwargs)

        scoring.forward_hooks = failing
    run_study(cfg, out, world=world)


@pytest.fixture(scope="module")
def one_process(tiny_study):
    cfg, root = tiny_study
    codes, errors, _ = spawn(_study, 1, root, cfg, str(root / "one"))
    assert codes == [0], errors
    return root / "one"


def numbers(run: Path) -> dict:
    metrics = json.loads((run / "metrics.json").read_text())
    return {k: v for k, v in flatten(metrics).items() if not k.startswith("timings.")}


def assert_same_run(a: Path, b: Path) -> None:
    """Same metrics (exact for counts, to float reduction order for the rest), directions to 1e-5,
    identical latent counts, histograms and maxima with their records."""
    from saefeatures.directions import EmotionDirections
    from saefeatures.sae import LatentScores

    ma, mb = numbers(a), numbers(b)
    assert ma.keys() == mb.keys()
    for k, va in ma.items():
        vb = mb[k]
        if isinstance(va, float) and isinstance(vb, float) and not (math.isnan(va) and math.isnan(vb)):
            assert vb == pytest.approx(va, rel=1e-4, abs=1e-5), k
        elif not isinstance(va, float):
            assert va == vb, k
    for name in ("dense", "sae", "sae-k1", "sae-k2"):
        da, db = EmotionDirections.load(a / "directions" / name), EmotionDirections.load(b / "directions" / name)
        assert da.names == db.names and da.latents == db.latents
        torch.testing.assert_close(db.vectors, da.vectors, atol=1e-5, rtol=0)
    sa, sb = LatentScores.load(a / "scores"), LatentScores.load(b / "scores")
    assert sa.record_ids == sb.record_ids and sa.classes == sb.classes
    for t in ("count", "hist", "fire", "tokens", "max", "max_record", "max_pos", "max_window", "hist_scale"):
        assert torch.equal(getattr(sa, t), getattr(sb, t)), t
    for t in ("sum", "sumsq"):
        torch.testing.assert_close(getattr(sb, t), getattr(sa, t), rtol=1e-12, atol=1e-12)
    assert (b / "report.html").is_file()


def test_the_study_on_two_ranks_matches_one_process(tiny_study, one_process):
    cfg, root = tiny_study
    codes, errors, _ = spawn(_study, 2, root, cfg, str(root / "two"))
    assert codes == [0, 0], errors
    assert_same_run(one_process, root / "two")
    manifest = json.loads((root / "two" / "manifest.json").read_text())
    assert all(e["done"] for e in manifest["stages"].values())
    from saefeatures.evals.probes import probe_cells

    ran = [Path(f"{root / 'two'}.probe-cells{r}").read_text().splitlines() for r in range(2)]
    assert ran[0] and ran[1] and sorted(ran[0] + ran[1]) == sorted(json.dumps(c) for c in probe_cells(cfg.probes))
    probes = "figures/probes/probes.json"  # the probes split over the ranks give one process's results
    assert (root / "two" / probes).read_text() == (one_process / probes).read_text()
    # other doses on a copy: only the probes (and the report) recompute, and rank 1 fails in them
    shutil.copytree(root / "two", root / "probe-fault")
    fewer = replace(cfg, probes=replace(cfg.probes, doses=[250, 4000, 16000]))
    codes, errors, _ = spawn(_study, 2, root, fewer, str(root / "probe-fault"), "probes", limit_s=300)
    assert codes == [1, 1]
    assert errors[0].startswith("RankFailure: rank 1 of 2 failed in stage 'probes': RuntimeError: injected fault"), errors


def test_a_rank_killed_while_scoring_loses_nothing_and_a_rerun_matches(tiny_study, one_process):
    cfg, root = tiny_study
    out = root / "killed"
    codes, errors, seconds = spawn(_study, 2, root, cfg, str(out), "kill")
    assert codes == [1, 9], errors
    assert "lost contact with the other ranks in stage 'scoring'" in errors[0]
    shards = sorted((out / "activations").glob("corpus-*/shard-*.safetensors"))
    assert any(int(s.stem.split("-")[1]) % 2 == 1 for s in shards)  # rank 1's rows, written before it died
    codes, errors, _ = spawn(_study, 2, root, cfg, str(out))
    assert codes == [0, 0], errors
    assert_same_run(one_process, out)


def test_a_failing_rank_ends_the_others_with_its_error(tiny_study):
    cfg, root = tiny_study
    codes, errors, seconds = spawn(_study, 2, root, cfg, str(root / "failing"), "raise", limit_s=300)
    assert codes == [1, 1]
    assert errors[1].startswith("RuntimeError: injected fault")
    assert errors[0].startswith("RankFailure: rank 1 of 2 failed in stage 'scoring': RuntimeError: injected fault")


# ------------------------------------------------------------ several SAEs, one per rank

SAE_VARIANTS = ["--layers", "1", "2", "--widths", "32", "48"]


@pytest.fixture(scope="module")
def sae_config(tiny_study) -> str:
    """A config file that trains tiny TopK SAEs on the stand-in model (100 steps of 64 tokens each)."""
    import yaml

    from saefeatures.study.config import to_dict

    cfg, root = tiny_study
    t = copy.deepcopy(cfg.sae.train)
    t.k, t.training_tokens, t.train_batch_size_tokens, t.context_size, t.lr = 4, 100 * 64, 64, 64, 4e-3
    t.store_batch_size_prompts, t.n_batches_in_buffer, t.n_batches_for_norm_estimate = 4, 4, 2
    t.lr_warm_up_steps, t.dead_feature_window, t.n_checkpoints, t.llm_autocast = 5, 10, 1, False
    path = root / "sae-train.yaml"
    path.write_text(yaml.safe_dump(to_dict(replace(cfg, sae=replace(cfg.sae, train=t)))))
    return str(path)


def _sae_train(world: World, argv: list[str]) -> None:
    """`saefeatures sae train ARGV` on this rank, as torchrun runs it."""
    from saefeatures.study import cli

    cli.main(argv)


def _sae_train_failing(world: World, config: str, out: str) -> None:
    """The variants of `SAE_VARIANTS` on this rank; rank 1 fails in its first one."""
    from saefeatures.study import sae_variants
    from saefeatures.study.config import load_config

    def broken(*args, **kwargs):
        raise RuntimeError("injected fault")

    if world.rank == 1:
        sae_variants.train_run_sae = broken
    cfg = load_config(config)
    sae_variants.train_variants(cfg, sae_variants.plan_variants(cfg, [1, 2], [32, 48], out), world)


def test_saes_on_two_ranks_match_one_process_and_a_failing_rank_is_named(tiny_study, sae_config):
    from safetensors.torch import load_file

    _, root = tiny_study
    one, two = root / "saes-one", root / "saes-two"
    codes, errors, seconds_one = spawn(_sae_train, 1, root, ["sae", "train", "--config", sae_config, *SAE_VARIANTS,
                                                           "--out", str(one)])
    assert codes == [0], errors
    # variants in order (W32: L1, L2; W48: L1, L2), dealt round robin: rank 1 fails in L2-W32, its first
    codes, errors, _ = spawn(_sae_train_failing, 2, root, sae_config, str(two), limit_s=300)
    assert codes == [1, 1]
    assert errors[1].startswith("RuntimeError: injected fault")
    assert errors[0].startswith("RankFailure: rank 1 of 2 failed in stage 'sae train L2-W32': RuntimeError: "
                                "injected fault (this is rank 0, in stage 'sae train L1-W32')"), errors[0]
    kept = two / "L1-W32" / "sae" / "sae_weights.safetensors"
    assert kept.is_file() and not (two / "L2-W32" / "sae").exists()
    mtime = kept.stat().st_mtime_ns
    codes, errors, seconds_two = spawn(_sae_train, 2, root, ["sae", "train", "--config", sae_config, *SAE_VARIANTS,
                                                           "--out", str(two)])
    assert codes == [0, 0], errors
    assert kept.stat().st_mtime_ns == mtime  # rank 0's finished SAE was reused, not trained again
    summaries = [json.loads((d / "summary.json").read_text())["variants"] for d in (one, two)]
    names = ["L1-W32", "L2-W32", "L1-W48", "L2-W48"]
    assert [Path(v["sae_dir"]).parent.name for v in summaries[1]] == names
    for a, b, name in zip(*summaries, names):
        assert (a["layer"], a["width"]) == (b["layer"], b["width"]) == (int(name[1]), int(name[4:]))
        assert b["final_fvu"] == pytest.approx(a["final_fvu"], rel=1e-5) and a["final_fvu"] < 0.8  # trained
        wa, wb = (load_file(d / name / "sae" / "sae_weights.safetensors") for d in (one, two))
        assert wa.keys() == wb.keys()
        for k in wa:  # the same SAE whichever rank, and however many, trained it
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    print(f"4 SAEs: 1 process {seconds_one:.0f} s, 2 ranks (3 left to train) {seconds_two:.0f} s")


# ------------------------------------------------------------ the corpus build

class StableGenerator:
    """A stand-in for the model whose texts depend on the prompt and seed only (in any process);
    ``die_after``: the process ends (as if killed) before its batch of that number."""

    def __init__(self, die_after: int | None = None):
        self.tokenizer = lambda text, add_special_tokens=False: type("Enc", (), {"input_ids": text.split()})()
        self.die_after, self.calls = die_after, 0

    def generate(self, prompts, seed, banned=None):
        if self.die_after is not None and self.calls >= self.die_after:
            os._exit(9)
        self.calls += 1
        story = " ".join(["The morning light came in slowly over the quiet kitchen table."] * 5)
        return [f"{story} Seed {seed} prompt {zlib.crc32(p.encode()) % 997}." for p in prompts]


def _build(world: World, out: str, die_after: int | None = None) -> None:
    from saefeatures.corpus_build import CorpusConfig, build_corpus
    from saefeatures.generation import GenerationConfig

    cfg = CorpusConfig(emotions=["calm", "afraid", "happy"], stories_per_emotion=6, neutral_per_topic=1, topics=12,
                       recipe="paper", generation=GenerationConfig(batch_size=4))
    gen = StableGenerator(die_after if world.rank == 1 else None)
    report = build_corpus(cfg, out, gen, "m", world=world)
    Path(f"{out}.report{world.rank}").write_text(json.dumps([report.generated, report.kept]))


def test_corpus_build_on_two_ranks_writes_what_one_process_writes_and_resumes(tmp_path):
    codes, errors, _ = spawn(_build, 1, tmp_path, str(tmp_path / "one.jsonl"))
    assert codes == [0], errors
    reference = (tmp_path / "one.jsonl").read_bytes()
    codes, errors, _ = spawn(_build, 2, tmp_path, str(tmp_path / "two.jsonl"))
    assert codes == [0, 0], errors
    assert (tmp_path / "two.jsonl").read_bytes() == reference
    assert not list(tmp_path.glob("two.jsonl.part*"))
    generated = json.loads((tmp_path / "two.jsonl.report0").read_text())[0]
    assert generated == json.loads((tmp_path / "one.jsonl.report0").read_text())[0]  # summed over ranks
    # rank 1 dies after two batches; a rerun on one process takes every rank's part and merges
    codes, errors, _ = spawn(_build, 2, tmp_path, str(tmp_path / "killed.jsonl"), 2)
    assert codes == [1, 9] and "lost contact" in errors[0]
    part = [json.loads(line) for line in (tmp_path / "killed.jsonl.part1").read_text().splitlines()]
    assert len({r["batch"] for r in part}) == 2  # what rank 1 wrote before it died is kept
    codes, errors, _ = spawn(_build, 1, tmp_path, str(tmp_path / "killed.jsonl"))
    assert codes == [0], errors
    assert (tmp_path / "killed.jsonl").read_bytes() == reference
    assert not list(tmp_path.glob("killed.jsonl.part*"))
