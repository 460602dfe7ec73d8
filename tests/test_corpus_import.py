"""Importing external story sets (the paper's emotion/topic/text JSONL) as corpora, good files and bad."""

import gzip
import json
from pathlib import Path

import pytest

from saefeatures.study.cli import main
from saefeatures.corpus import load_corpus, validate_corpus
from saefeatures.corpus_import import (StorySetError, assign_splits, cap_per_emotion, import_corpus, read_story_set,
                                       story_set_key)

BENCH = Path(__file__).resolve().parents[2] / "shared" / "data" / "emotion-vector-bench" / "stories"
TOPICS = [f"Someone finds note number {i}" for i in range(12)]


def _lines(emotions=("afraid", "happy", "sad"), per_topic: int = 2, **extra) -> list[dict]:
    return [{"emotion": e, "topic": t, "story_index": k, "perspective": "first",
             "text": f"A story of {t.lower()}, number {k}, told plainly.", **extra}
            for e in emotions for t in TOPICS for k in range(per_topic)]


def _write(path: Path, rows: list) -> Path:
    text = "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)
    if path.suffix == ".gz":
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text)
    return path


def test_import_writes_a_corpus_the_study_loads(tmp_path):
    src = _write(tmp_path / "stories.jsonl", _lines())
    report = import_corpus(src, tmp_path / "out.jsonl.gz", model_id="some-model")
    records = load_corpus(tmp_path / "out.jsonl.gz")
    assert report.n_records == len(records) == 3 * 12 * 2 and report.splits_from == "topics"
    assert len({r.id for r in records}) == len(records)
    assert {r.split for r in records} == {"train", "val", "test"}
    assert all(len({r.split for r in records if r.topic == t}) == 1 for t in TOPICS)  # topic-disjoint
    assert {r.model_id for r in records} == {"some-model"} and {r.kind for r in records} == {"story"}
    assert records[0].generation["perspective"] == "first"
    assert validate_corpus(tmp_path / "out.jsonl.gz")["n_emotions"] == 3


def test_directory_gz_files_and_given_splits(tmp_path):
    (tmp_path / "set").mkdir()
    rows = _lines()
    for e in ("afraid", "happy", "sad"):
        _write(tmp_path / "set" / f"{e}.jsonl.gz", [r for r in rows if r["emotion"] == e])
    (tmp_path / "set" / "README.md").write_text("not a story file")
    assert len(read_story_set(tmp_path / "set")) == len(rows)
    given = [{**r, "split": "train" if TOPICS.index(r["topic"]) < 10 else "test"} for r in rows]
    report = import_corpus(_write(tmp_path / "given.jsonl", given), tmp_path / "given-out.jsonl")
    assert report.splits_from == "file" and report.stats["splits"] == {"train": 60, "test": 12}


def test_missing_field_and_bad_lines_name_the_line(tmp_path):
    rows = _lines()
    del rows[3]["topic"]
    with pytest.raises(StorySetError, match=r"stories.jsonl:4: missing field\(s\) topic"):
        import_corpus(_write(tmp_path / "stories.jsonl", rows), tmp_path / "out.jsonl")
    with pytest.raises(StorySetError, match=r"bad.jsonl:2: not valid JSON"):
        read_story_set(_write(tmp_path / "bad.jsonl", [_lines()[0], "{not json"]))
    with pytest.raises(StorySetError, match="field 'text' must be a non-empty string"):
        read_story_set(_write(tmp_path / "empty.jsonl", [{**_lines()[0], "text": " "}]))
    with pytest.raises(StorySetError, match="Story set not found"):
        read_story_set(tmp_path / "nowhere.jsonl")
    assert not (tmp_path / "out.jsonl").exists()


def test_unknown_emotion_fails_unless_dropped(tmp_path):
    src = _write(tmp_path / "stories.jsonl", _lines(("afraid", "happy", "hopeless")))
    with pytest.raises(StorySetError, match=r"Unknown emotion 'hopeless'.*--drop-unknown"):
        import_corpus(src, tmp_path / "out.jsonl")
    report = import_corpus(src, tmp_path / "out.jsonl", drop_unknown=True)
    assert report.dropped_unknown == {"hopeless": 24} and report.stats["n_emotions"] == 2


def test_topic_in_two_splits_fails(tmp_path):
    given = [{**r, "split": "train"} for r in _lines()]
    given[0]["split"] = "test"  # the first topic now in train and test
    with pytest.raises(StorySetError, match="topic-disjoint"):
        import_corpus(_write(tmp_path / "overlap.jsonl", given), tmp_path / "out.jsonl")
    given[0]["split"] = "holdout"
    with pytest.raises(StorySetError, match="split 'holdout'"):
        import_corpus(_write(tmp_path / "badsplit.jsonl", given), tmp_path / "out.jsonl")
    del given[0]["split"]
    with pytest.raises(StorySetError, match="some lines have a split"):
        import_corpus(_write(tmp_path / "mixed.jsonl", given), tmp_path / "out.jsonl")


def test_split_assignment_and_cap(tmp_path):
    splits = assign_splits(TOPICS[:3])
    assert sorted(splits.values()) == ["test", "train", "val"]
    assert assign_splits(list(reversed(TOPICS))) == assign_splits(TOPICS)  # order-free
    with pytest.raises(StorySetError, match="at least 3"):
        assign_splits(TOPICS[:2])
    stories = read_story_set(_write(tmp_path / "s.jsonl", _lines(per_topic=3)))
    capped = cap_per_emotion(stories, 12)
    assert len(capped) == 36 and len({s.topic for s in capped}) == 12  # one story of every topic first


def test_cli_import_and_its_errors(tmp_path, capsys):
    src = _write(tmp_path / "stories.jsonl", _lines(("afraid", "hopeless")))
    with pytest.raises(SystemExit) as e:
        main(["corpus", "import", str(src), "--out", str(tmp_path / "c.jsonl.gz")])
    assert e.value.code == 2
    main(["corpus", "import", str(src), "--out", str(tmp_path / "c.jsonl.gz"), "--model-id", "m", "--drop-unknown"])
    assert json.loads(capsys.readouterr().out)["n_records"] == 24


@pytest.mark.skipif(not BENCH.is_dir(), reason="needs ../shared/data/emotion-vector-bench")
def test_import_emotion_vector_bench(tmp_path):
    report = import_corpus(BENCH, tmp_path / "bench.jsonl.gz", model_id="claude-sonnet-4.5", drop_unknown=True)
    assert report.dropped_unknown == {"hopeless": 75}
    assert report.stats["n_emotions"] == 19 and report.n_records == 19 * 75
    assert set(report.stats["splits"]) == {"train", "val", "test"}
    assert story_set_key(BENCH) == story_set_key(BENCH) != story_set_key(BENCH / "proud.jsonl")


def test_run_rejects_a_bad_reader_path_before_loading_anything(tmp_path):
    from saefeatures.study.config import RunConfig, from_dict
    from saefeatures.study.pipeline import run_study

    cfg = from_dict(RunConfig, {"evals": {"reader_path": str(tmp_path / "missing")}})
    with pytest.raises(StorySetError, match="Story set not found"):
        run_study(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()
