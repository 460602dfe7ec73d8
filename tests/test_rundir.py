"""The run directory: lock, atomic writes, corrupt artifacts, section replacement, read-only use."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saefeatures.files import CorruptArtifactError, load_safetensors, read_json, save_safetensors, write_json
from saefeatures.keys import key_of
from saefeatures.study.rundir import RunDir, RunDirError

ROOT = Path(__file__).resolve().parents[1]


def test_second_open_fails_at_once_naming_the_holder_pid(tmp_path):
    run = RunDir.open(tmp_path / "run")
    held = rf"{tmp_path / 'run'} is in use by another saefeatures run \(pid {os.getpid()}\)"
    with pytest.raises(RunDirError, match=held):
        RunDir.open(tmp_path / "run")
    run.close()
    RunDir.open(tmp_path / "run").close()  # released


def test_lock_held_by_another_process_names_its_pid(tmp_path):
    out = tmp_path / "run"
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom saefeatures.study.rundir import RunDir\n"
         f"r = RunDir.open({str(out)!r})\nprint('locked', flush=True)\nsys.stdin.read()"],
        cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "locked"
        with pytest.raises(RunDirError, match=rf"in use by another saefeatures run \(pid {child.pid}\)"):
            RunDir.open(out)
    finally:
        child.stdin.close()
        child.wait(30)
    RunDir.open(out).close()  # the lock went with the process


def test_atomic_writes_leave_no_temp_and_keep_the_old_file_on_failure(tmp_path):
    target = tmp_path / "a.json"
    write_json(target, {"x": 1})
    with pytest.raises(TypeError):
        write_json(target, {"x": object()})
    assert read_json(target) == {"x": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]
    save_safetensors(tmp_path / "t.safetensors", {"v": torch.arange(4.0)})
    assert load_safetensors(tmp_path / "t.safetensors")["v"].tolist() == [0, 1, 2, 3]
    assert oct((tmp_path / "t.safetensors").stat().st_mode & 0o777) != oct(0o600)  # not mkstemp's private mode


def test_truncated_json_and_safetensors_are_named(tmp_path):
    write_json(tmp_path / "m.json", {"a": list(range(50))})
    save_safetensors(tmp_path / "s.safetensors", {"v": torch.randn(64, 64)})
    for name in ("m.json", "s.safetensors"):
        data = (tmp_path / name).read_bytes()
        (tmp_path / name).write_bytes(data[: len(data) // 2])
    with pytest.raises(CorruptArtifactError, match=r"m\.json is corrupt"):
        read_json(tmp_path / "m.json")
    with pytest.raises(CorruptArtifactError, match=r"s\.safetensors is corrupt"):
        load_safetensors(tmp_path / "s.safetensors")


def test_reuse_skips_only_unchanged_stages_whose_outputs_load(tmp_path):
    run = RunDir.open(tmp_path)
    out = tmp_path / "out.json"
    with run.stage("a", "k1"):
        write_json(out, [1, 2])
    assert run.reuse("a", "k1", lambda: read_json(out)) == [1, 2]
    assert run.reuse("a", "k2", lambda: read_json(out)) is None  # inputs changed
    out.write_text("[1, ")
    assert run.reuse("a", "k1", lambda: read_json(out)) is None  # corrupt: recompute
    out.unlink()
    assert run.reuse("a", "k1", lambda: read_json(out)) is None
    assert run.skipped == ["a"] and run.recomputed == ["a"]
    assert "skipped (inputs unchanged): a; recomputed: a" in run.summary()


def test_interrupted_stage_is_not_trusted_on_disk(tmp_path):
    run = RunDir.open(tmp_path)
    with run.stage("a", "k"):
        pass
    with pytest.raises(KeyboardInterrupt), run.stage("a", "k"):
        raise KeyboardInterrupt
    run.close()
    again = RunDir.open(tmp_path)
    assert not again.is_done("a", "k")  # outputs may be half rewritten


def test_replace_drops_a_recomputed_sections_old_keys(tmp_path):
    run = RunDir.open(tmp_path)
    run.record("steering", {"happy": {"x": 1.0}, "afraid": {"x": 2.0}})
    run.record("probes", {"p": 1.0})
    run.replace("steering", {"happy": {"x": 3.0}})
    assert read_json(tmp_path / "metrics.json") == {"steering": {"happy": {"x": 3.0}}, "probes": {"p": 1.0}}


def test_corrupt_metrics_json_is_named_and_every_stage_recomputes(tmp_path, caplog):
    run = RunDir.open(tmp_path)
    with run.stage("a", "k"):
        run.record("s", {"v": 1.0})
    run.close()
    (tmp_path / "metrics.json").write_text('{"s": {"v"')
    again = RunDir.open(tmp_path)
    assert f"{tmp_path / 'metrics.json'} is corrupt" in caplog.text
    assert not again.is_done("a", "k") and again.metrics == {}


def test_stale_temps_of_a_killed_writer_are_removed_on_open(tmp_path):
    (tmp_path / "figs").mkdir()
    (tmp_path / "figs" / ".probes.json.abc123.tmp").write_text("half")
    RunDir.open(tmp_path).close()
    assert not list(tmp_path.rglob("*.tmp"))


def test_finished_run_reopens_read_only(tmp_path):
    run = RunDir.open(tmp_path)
    run.record("dense", {"auroc": 0.6})
    view = RunDir.open(tmp_path, readonly=True)  # no lock needed while the writer holds it
    assert view.metrics["dense"]["auroc"] == 0.6
    with pytest.raises(RunDirError, match="read-only"):
        view.save()
    with pytest.raises(RunDirError, match="not a run directory"):
        RunDir.open(tmp_path / "nothing", readonly=True)


def test_reopening_without_computing_leaves_the_record_byte_identical(tmp_path):
    """What only describes the process (started, machine, timings, a keyless stage's time) is
    written only along with something computed (issue: `score` on a finished run rewrote them)."""
    run = RunDir.open(tmp_path)
    run.manifest.update({"started": "t0", "machine": {"torch_threads": 2}})
    with run.stage("model"):
        pass
    with run.stage("a", "k"):
        run.record("s", {"v": 1.0})
    run.close()
    files = [tmp_path / "manifest.json", tmp_path / "metrics.json"]
    before = [f.read_bytes() for f in files]
    again = RunDir.open(tmp_path)
    again.manifest.update({"started": "t1", "machine": {"torch_threads": 4}, "last_run": {"recomputed": []}})
    with again.stage("model"):
        pass
    assert again.reuse("a", "k", lambda: True)
    again.replace("s", {"v": 1.0})
    again.record("timings", {"total_s": 9.0})
    assert [f.read_bytes() for f in files] == before
    with again.stage("b", "k2"):  # something computed: the process's entries go with it
        pass
    assert read_json(files[0])["started"] == "t1" and "b_s" in read_json(files[1])["timings"]
    again.record("timings", {"total_s": 10.0})  # a process that computed saves its own entries from then on
    assert read_json(files[1])["timings"]["total_s"] == 10.0
    assert "model" not in read_json(files[0])["stages"]


def test_key_of_hashes_tensor_contents():
    a = torch.zeros(3, 4)
    b = a.clone()
    b[2, 3] = 1e-7  # a change a rounded sum would miss
    assert key_of(a) == key_of(a.clone()) != key_of(b)


def _make_unwritable(path: Path) -> bool:
    """chmod 555; as root (which ignores modes) also the immutable attribute, if the filesystem has it."""
    path.chmod(0o555)
    if os.access(path, os.W_OK):
        subprocess.run(["chattr", "+i", str(path)], capture_output=True)
    probe = path / ".probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    return False


def test_unwritable_out_dir_is_one_line_naming_the_path(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    if not _make_unwritable(ro):
        pytest.skip("cannot make a directory unwritable here")
    try:
        with pytest.raises(RunDirError, match=rf"cannot write to run directory {ro / 'run'}"):
            RunDir.open(ro / "run")
        with pytest.raises(RunDirError, match=rf"cannot write to run directory {ro} "):
            RunDir.open(ro)
        cfg = tmp_path / "c.yaml"
        cfg.write_text("tracking: {mode: disabled}\n")
        proc = subprocess.run([sys.executable, "-m", "saefeatures", "run", str(cfg), "--out", str(ro / "run")],
                              cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 2, proc.stderr
        lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and str(ro / "run") in lines[0] and "Traceback" not in proc.stderr, proc.stderr
    finally:
        subprocess.run(["chattr", "-i", str(ro)], capture_output=True)
        ro.chmod(0o755)
