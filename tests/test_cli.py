"""Every bad input to the command line ends in one line, ``error: ...``, exit status 2, before the
model loads (loading it fails these tests), and without a traceback unless ``--debug``."""

from __future__ import annotations

import gzip
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import saefeatures.study.commands  # noqa: F401 - bound before no_model_load patches the loaders
from saefeatures.corpus import CorpusRecord
from saefeatures.study import cli

EMOTIONS = ("happy", "sad", "afraid", "calm")


@pytest.fixture(autouse=True)
def no_model_load(monkeypatch):
    """Loading the model is the slow work every check must come before: here it fails the test."""
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the bad input was found")

    for name, module in list(sys.modules.items()):  # every module that bound the loaders by name
        if name.startswith("saefeatures"):
            for loader in ("load_model", "load_hf"):
                if hasattr(module, loader):
                    monkeypatch.setattr(module, loader, refuse)


def fails(argv: list[str], capsys) -> str:
    """Run the CLI; assert exit 2 and a single ``error:`` line on stderr; return that line."""
    with pytest.raises(SystemExit) as exit_:
        cli.main([str(a) for a in argv])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2, err
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def record(i: int, emotion: str, split: str, **changes) -> dict:
    topic = f"{split}-topic-{i % 2}"
    kind = "neutral" if emotion == "neutral" else "story"
    rec = CorpusRecord(id=f"{emotion}-{split}-{i}", emotion=emotion, topic=topic, kind=kind, split=split,
                       prompt="Write a story.", text="A short text about a day in town. " * 3, model_id="m", seed=0)
    return {**json.loads(rec.to_json()), **changes}


def corpus_lines(emotions=EMOTIONS, splits=("train", "test")) -> list[dict]:
    return [record(i, e, s) for s in splits for e in (*emotions, "neutral") for i in range(2)]


def write_corpus(path, rows: list[dict]) -> str:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if str(path).endswith(".gz"):
        path.write_bytes(gzip.compress(text.encode()))
    else:
        path.write_text(text)
    return str(path)


def write_config(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def write_sae(path, d_in=576, d_sae=64, hook="blocks.18.hook_resid_post", weights_d_sae=None, **cfg_changes):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": d_sae, "dtype": "float32",
           "metadata": {"hook_name": hook}, **cfg_changes}
    (path / "cfg.json").write_text(json.dumps(cfg))
    n = weights_d_sae or d_sae
    save_file({"W_enc": torch.zeros(d_in, n), "W_dec": torch.zeros(n, d_in), "b_enc": torch.zeros(n),
               "b_dec": torch.zeros(d_in)}, str(path / "sae_weights.safetensors"))
    return path


def run(tmp_path, config_text: str) -> list[str]:
    return ["run", write_config(tmp_path / "c.yaml", config_text), "--out", tmp_path / "out"]


@pytest.mark.parametrize("text, message", [
    ("modle:\n  layer: 3\n", r"Unknown config key\(s\): modle"),
    ("model:\n  layer: twenty\n", r"model\.layer: expected int"),
    ("model:\n  layer: 40\n", r"model\.layer: layer 40 is out of range .*use 0\.\.29"),
    ("activations:\n  layers: [31]\n", r"activations\.layers: layer 31 is out of range"),
    ("", r"c\.yaml is empty\. Start from a config in configs/"),
    ("# only a comment\n", r"c\.yaml is empty"),
    ("model:\n  name: [x\n", r"c\.yaml:\d+:\d+: YAML syntax error"),
    ("model:\n  dtype: float64\n", r"model\.dtype: 'float64' is not one of"),
    ("steering:\n  strengths: [-0.1, 0.0, 0.1]\n", r"steering\.strengths must hold 0 .*negative ones steer away"),
    ("steering:\n  strengths: [0.1, 0.2]\n", r"steering\.strengths must hold 0 \(the unsteered baseline\)"),
    ("steering:\n  emotions: [happy, hapy]\n", r"steering\.emotions: Unknown emotion 'hapy'\. Did you mean: happy"),
    ("steering:\n  methods: [dense, pca]\n", r"steering\.methods: 'pca' is not one of"),
    ("monitor:\n  emotions: [afraid, scarred]\n", r"monitor\.emotions: Unknown emotion 'scarred'"),
    ("sae:\n  source: hub\n", r"sae\.source: 'hub' is not one of local, pretrained, train"),
    ("sae_directions:\n  recipe:\n    select: greedy\n", r"sae_directions\.recipe\.select: 'greedy' is not one of pursuit, rank"),
    ("sae_directions:\n  recipe:\n    candidates: 0\n", r"sae_directions\.recipe\.candidates: must be a number >= 1"),
    ("model:\n  name: no-such-model-xyz\n", r"model\.name: 'no-such-model-xyz' is neither"),
])
def test_bad_config(tmp_path, capsys, text, message):
    err = fails(run(tmp_path, text), capsys)
    assert re.search(message, err), err
    assert not (tmp_path / "out").exists()  # nothing written either


def bad_corpus(tmp_path, case: str) -> str:
    rows = corpus_lines()
    name = "c.jsonl"
    if case == "corrupt line":
        rows[1] = '{"id": "x", "emotion": '
    elif case == "unknown emotion":
        rows[0] = record(0, "hapy", "train")
    elif case == "missing field":
        rows[0] = {k: v for k, v in rows[0].items() if k != "topic"}
    elif case == "null text":
        rows[0]["text"] = None
    elif case == "empty":
        rows = []
    elif case == "two emotions":
        rows = corpus_lines(emotions=("happy", "sad"))
    elif case == "no test topics":
        rows = corpus_lines(splits=("train",))
    elif case == "truncated gzip":
        name = "c.jsonl.gz"
    path = write_corpus(tmp_path / name, rows)
    if case == "truncated gzip":
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize("case, message", [
    ("corrupt line", r"c\.jsonl:2: corrupt corpus line"),
    ("unknown emotion", r"c\.jsonl: record hapy-train-0: Unknown emotion 'hapy'"),
    ("missing field", r"c\.jsonl:1: corrupt corpus line \(missing fields \['topic'\]\)"),
    ("null text", r"c\.jsonl:1: corrupt corpus line \(wrong type: text=None\)"),
    ("empty", r"c\.jsonl holds no kept records"),
    ("two emotions", r"train split has 2 emotion\(s\) with valence ratings .*at least 3"),
    ("no test topics", r"no emotion records in split 'test' \(evals\.split\)"),
    ("truncated gzip", r"c\.jsonl\.gz: truncated or not gzip after line \d+ \(EOFError"),
])
def test_bad_corpus(tmp_path, capsys, case, message):
    path = bad_corpus(tmp_path, case)
    err = fails(run(tmp_path, f"corpus:\n  path: {path}\n"), capsys)
    assert re.search(message, err), err


def test_corpus_without_a_steered_emotion(tmp_path, capsys):
    path = write_corpus(tmp_path / "c.jsonl", corpus_lines())  # no 'desperate' (a default monitor emotion)
    err = fails(run(tmp_path, f"corpus:\n  path: {path}\n"), capsys)
    assert "monitor.emotions: desperate not in the corpus's train split" in err


def test_good_small_corpus_gets_past_the_checks(tmp_path, capsys):
    """The same tiny corpus with the named emotions passes every check and reaches the model load."""
    path = write_corpus(tmp_path / "c.jsonl", corpus_lines(emotions=(*EMOTIONS, "desperate")))
    with pytest.raises(SystemExit):
        cli.main([str(a) for a in run(tmp_path, f"corpus:\n  path: {path}\n")])
    assert "the model was loaded" in capsys.readouterr().err


@pytest.mark.parametrize("case, message", [
    ("width", r"sae_weights\.safetensors holds W_enc of shape \[576, 64\], but cfg\.json says d_in 576, d_sae 100"),
    ("hook", r"Hook mismatch: the SAE in .* reads 'blocks\.6\.hook_resid_post', but the config studies "
             r"'blocks\.18\.hook_resid_post'"),
    ("d_model", r"Width mismatch: the SAE in .* has input width d_in 32, but the model has d_model 576"),
    ("no weights", r"not a SAELens SAE directory: sae_weights\.safetensors missing"),
    ("bad cfg.json", r"cfg\.json: not valid JSON"),
    ("no d_sae", r"cfg\.json: d_sae missing or not a positive integer"),
    ("truncated", r"sae_weights\.safetensors: unreadable or truncated safetensors file"),
    ("missing dir", r"No SAE directory at"),
])
def test_bad_sae(tmp_path, capsys, case, message):
    sae = tmp_path / "sae"
    if case == "width":
        write_sae(sae, d_sae=100, weights_d_sae=64)
    elif case == "hook":
        write_sae(sae, hook="blocks.6.hook_resid_post")
    elif case == "d_model":
        write_sae(sae, d_in=32)
    elif case == "no weights":
        write_sae(sae)
        (sae / "sae_weights.safetensors").unlink()
    elif case == "bad cfg.json":
        write_sae(sae)
        (sae / "cfg.json").write_text('{"d_in": 576,')
    elif case == "no d_sae":
        write_sae(sae)
        (sae / "cfg.json").write_text(json.dumps({"d_in": 576, "metadata": {"hook_name": "x"}}))
    elif case == "truncated":
        write_sae(sae)
        data = (sae / "sae_weights.safetensors").read_bytes()
        (sae / "sae_weights.safetensors").write_bytes(data[:-100])
    err = fails(run(tmp_path, f"sae:\n  path: {sae}\n"), capsys)
    assert re.search(message, err), err


def test_sae_width_mismatch_when_loading_is_one_clear_error(tmp_path):
    """The loader itself (not only the pre-check) names the file instead of a state_dict traceback."""
    from saefeatures.sae import SAELoadError, load_sae

    sae = write_sae(tmp_path / "sae", d_sae=100, weights_d_sae=64)
    with pytest.raises(SAELoadError, match="holds W_enc of shape"):
        load_sae(sae)


def write_directions(path, names=("happy", "sad", "afraid")) -> str:
    from saefeatures.directions import EmotionDirections

    EmotionDirections(list(names), 18, torch.nn.functional.normalize(torch.randn(len(names), 576), dim=1)).save(path)
    return str(path)


@pytest.mark.parametrize("case, message", [
    ("missing key", r"directions\.json lacks the key\(s\) hook: not written by EmotionDirections\.save"),
    ("truncated", r"directions\.safetensors is corrupt: unreadable or truncated safetensors file"),
    ("bad json", r"directions\.json is corrupt: not valid JSON"),
    ("missing dir", r"directions\.json not found"),
])
def test_bad_directions(tmp_path, capsys, case, message):
    d = tmp_path / "dirs"
    if case != "missing dir":
        write_directions(d)
    if case == "missing key":
        meta = json.loads((d / "directions.json").read_text())
        del meta["hook"]
        (d / "directions.json").write_text(json.dumps(meta))
    elif case == "truncated":
        data = (d / "directions.safetensors").read_bytes()
        (d / "directions.safetensors").write_bytes(data[:-64])
    elif case == "bad json":
        (d / "directions.json").write_text("{")
    err = fails(["geometry", d], capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("args, message", [
    (["--emotion", "happy=inf", "--directions", "DIRS"], r"'happy=inf': the value must be a finite number"),
    (["--emotion", "happy=nan", "--directions", "DIRS"], r"'happy=nan': the value must be a finite number"),
    (["--emotion", "happy=lots", "--directions", "DIRS"], r"'happy=lots': expected NAME=NUMBER"),
    (["--emotion", "hapy=0.1", "--directions", "DIRS"], r"Unknown emotion 'hapy'\. Did you mean: happy"),
    (["--emotion", "happy=0.1"], r"--emotion needs --directions DIR"),
    (["--emotion", "calm=0.1", "--directions", "DIRS"], r"calm not in the directions at"),
    (["--latent=-3=1"], r"SAE latent ids are 0 or more"),
    (["--latent", "5=1", "--config", "LAYER10"], r"--latent needs an SAE.*No SAE is shipped for "
                                                 r"smollm2-135m-instruct layer 10.*Or give --sae DIR"),
    (["--latent", "5=1", "--sae", "MISSING"], r"No SAE directory at"),
])
def test_bad_steering_arguments(tmp_path, capsys, args, message):
    subst = {"DIRS": lambda: write_directions(tmp_path / "dirs"),
             "LAYER10": lambda: write_config(tmp_path / "c.yaml", "model:\n  layer: 10\n"),
             "MISSING": lambda: str(tmp_path / "nope")}
    args = [subst[a]() if a in subst else a for a in args]
    err = fails(["steer", *args], capsys)
    assert re.search(message, err), err


def test_other_subcommands_check_before_loading(tmp_path, capsys):
    cfg = write_config(tmp_path / "c.yaml", "model:\n  layer: 99\n")
    for argv in (["sae", "train", "--config", cfg], ["sae", "eval", "--config", cfg],
                 ["corpus", "build", "--config", cfg, "--out", tmp_path / "b.jsonl"],
                 ["activations", cfg, "--out", tmp_path / "o"], ["score", cfg, "--out", tmp_path / "o"],
                 ["directions", "build", cfg, "--out", tmp_path / "o"], ["steer", "--config", cfg]):
        assert "layer 99 is out of range" in fails(argv, capsys), argv
    assert "expected comma-separated integers" in fails(
        ["sweep", "configs/smollm2-135m.yaml", "--layers", "8,x", "--out", tmp_path / "s"], capsys)
    assert "layer 31 is out of range" in fails(
        ["sweep", "configs/smollm2-135m.yaml", "--layers", "8,31", "--out", tmp_path / "s"], capsys)
    assert "Unknown emotion 'hapy'" in fails(
        ["corpus", "build", "--emotions", "happy,hapy", "--out", tmp_path / "b.jsonl"], capsys)


@pytest.mark.parametrize("build, message", [
    ("steer: 0.1", r"corpus\.build\.steer > 0 needs corpus\.build\.steer_directions"),
    ("steer: 0.1\n    steer_directions: MISSING", r"corpus\.build\.steer_directions: cannot load directions from .*nope"),
    ("steer: 0.1\n    steer_directions: DIRS", r"has no direction for 1 emotion\(s\) of the build \(calm\)"),
    ("steer: -1", r"corpus\.build\.steer: must be a number >= 0"),
])
def test_steered_corpus_build_checks_its_directions_before_loading(tmp_path, capsys, build, message):
    build = build.replace("MISSING", str(tmp_path / "nope")).replace("DIRS", write_directions(tmp_path / "dirs"))
    cfg = write_config(tmp_path / "c.yaml", f"corpus:\n  build:\n    emotions: [happy, calm]\n    {build}\n")
    err = fails(["corpus", "build", "--config", cfg, "--out", tmp_path / "b.jsonl"], capsys)
    assert re.search(message, err), err


@pytest.mark.parametrize("args, message", [
    (["--widths", "4608", "0"], r"--widths 0: a width is a positive whole number of latents"),
    (["--widths", "4608", "wide"], r"--widths wide: expected whole numbers, e\.g\. --widths 4608 9216"),
    (["--layers", "10", "2.5"], r"--layers 2\.5: expected whole numbers"),
    (["--layers", "10", "40"], r"--layers 40: out of range for smollm2-135m-instruct \(30 layers\): use 0\.\.29"),
    (["--layers", "-1"], r"--layers -1: a layer is a block index, 0 or more"),
    (["--layers", "10", "--config", "HOOK"], r"sae\.hook is blocks\.6\.hook_resid_post, one layer's hook"),
])
def test_bad_sae_variants_fail_before_the_model_loads(tmp_path, capsys, args, message):
    args = [write_config(tmp_path / "c.yaml", "sae:\n  hook: blocks.6.hook_resid_post\n") if a == "HOOK" else a
            for a in args]
    err = fails(["sae", "train", *args, "--out", tmp_path / "saes"], capsys)
    assert re.search(message, err), err


def test_sae_variants_are_planned_in_a_fixed_order_each_in_its_own_directory(tmp_path):
    from saefeatures.distributed import World
    from saefeatures.study.config import RunConfig
    from saefeatures.study.sae_variants import plan_variants

    cfg = RunConfig()
    [one] = plan_variants(cfg)  # no --layers or --widths: the config's SAE, where it always went
    assert (one.layer, one.width, one.out) == (18, 4608, Path("runs/sae/smollm2-135m-instruct-L18"))
    variants = plan_variants(cfg, [10, 20, 10], [4608, 9216], tmp_path / "o", tmp_path / "ship")
    assert [v.name for v in variants] == ["L10-W4608", "L20-W4608", "L10-W9216", "L20-W9216"]
    assert variants[3].out == tmp_path / "o" / "L20-W9216" and variants[3].ship == tmp_path / "ship" / "L20-W9216"
    assert World(1, 2).mine(variants) == variants[1::2]  # each rank gets one of each width
    assert [v.name for v in plan_variants(cfg, widths=[64])] == ["L18-W64"]
    assert plan_variants(cfg, widths=[64])[0].out == Path("runs/sae/smollm2-135m-instruct/L18-W64")


def test_corpus_validate_rejects_an_empty_corpus(tmp_path, capsys):
    empty = tmp_path / "c.jsonl"
    empty.write_text("")
    assert "holds no kept records" in fails(["corpus", "validate", empty], capsys)
    unknown = write_corpus(tmp_path / "u.jsonl", [record(0, "hapy", "train")])
    assert "Unknown emotion 'hapy'" in fails(["corpus", "validate", unknown], capsys)


def test_debug_shows_the_traceback(tmp_path):
    from saefeatures.study.config import ConfigError

    cfg = write_config(tmp_path / "c.yaml", "model:\n  layer: 40\n")
    with pytest.raises(ConfigError, match="out of range"):
        cli.main(["run", cfg, "--out", str(tmp_path / "out"), "--debug"])
    with pytest.raises(ConfigError, match="out of range"):
        cli.main(["--debug", "run", cfg, "--out", str(tmp_path / "out")])


def test_a_bug_is_one_line_with_exit_1(monkeypatch, capsys):
    from saefeatures.directions import EmotionDirections

    def broken(path):
        raise KeyError("hook")

    monkeypatch.setattr(EmotionDirections, "load", broken)
    with pytest.raises(SystemExit) as exit_:
        cli.main(["geometry", "somewhere"])
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 1
    assert err == "error: KeyError: 'hook' (unexpected; rerun with --debug for the traceback)"


@pytest.mark.parametrize("args", [["--emotion", "happy=-0.2", "--directions", "DIRS"], ["--latent", "5=1"],
                                  ["--emotion", "sad=0.1", "--directions", "DIRS", "--method", "clamp"]])
def test_good_steering_arguments_get_past_the_checks(tmp_path, capsys, args):
    """Negative strengths steer away; the shipped SAE serves --latent: these reach the model load."""
    args = [write_directions(tmp_path / "dirs") if a == "DIRS" else a for a in args]
    with pytest.raises(SystemExit):
        cli.main(["steer", *args])
    assert "the model was loaded" in capsys.readouterr().err


LIGHT = """
import sys
from saefeatures.study.cli import main
try:
    main(sys.argv[1:])
except SystemExit as e:
    print("exit", e.code, "torch" in sys.modules)
"""


@pytest.mark.parametrize("argv, code", [(["--help"], 0), (["steer", "--help"], 0), (["read", "--help"], 0),
                                        (["steer", "--emotion", "afraid=0.3"], 2), (["nonsense"], 2),
                                        (["read", "hello", "--run", "no-such-run"], 2),
                                        (["report", "no-such-run"], 2)])
def test_help_and_argument_errors_come_back_without_torch(argv, code):
    """The CLI module imports no torch: help and argument errors need none (they took ~20 s)."""
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", LIGHT, *argv], cwd=root, capture_output=True, text=True, timeout=60)
    assert out.stdout.strip().splitlines()[-1] == f"exit {code} False", (out.stdout, out.stderr)
    if code == 2:
        assert out.stderr.strip().splitlines()[-1].startswith(("error: ", "saefeatures: error")), out.stderr
    check = "import sys, saefeatures.study.cli; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", check], cwd=root, check=True, timeout=60)


def test_the_console_script_prints_help():
    out = subprocess.run([sys.executable, "-m", "saefeatures", "--help"], capture_output=True, text=True, timeout=60,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0 and "read" in out.stdout and "monitor" in out.stdout and "report" in out.stdout


def test_a_latent_clamp_is_named_a_clamp():
    from saefeatures.steering import SteeringSpec

    assert SteeringSpec(latents={4068: 60.0}).summary() == ["clamp SAE latents (set): 4068=60"]
    assert SteeringSpec(emotions={"afraid": 0.3}, latents={5: 1.0}).summary() == [
        "add emotion directions: afraid=0.3", "clamp SAE latents (set): 5=1"]


def test_steer_with_latents_only_uses_the_shipped_sae_and_says_clamp(monkeypatch, capsys):
    """--latent without --sae or a config: the shipped SAE (as --help says), and the spec a clamp."""
    from saefeatures.sae import shipped_sae_dir
    from saefeatures.study import commands

    seen = {}
    monkeypatch.setattr(commands, "load_model", lambda *a, **k: "MODEL")
    monkeypatch.setattr(commands, "load_sae", lambda spec, model, layer: seen.update(spec=spec, layer=layer) or "SAE")
    monkeypatch.setattr(commands, "steer_prompts", lambda model, spec, prompts, **kw: [{"prompt": prompts[0]}])
    cli.main(["steer", "--latent", "4068=60", "--prompt", "Hi"])
    printed = json.loads(capsys.readouterr().out)
    assert seen["layer"] == 18 and Path(seen["spec"].path) == shipped_sae_dir("smollm2-135m-instruct", 18)
    assert printed["spec"]["method"] == "clamp" and printed["applies"] == ["clamp SAE latents (set): 4068=60"]
