import pytest

from saefeatures import emotions as emo


def test_171_paper_emotions_with_clusters():
    assert len(emo.EMOTIONS) == 171
    assert len(set(emo.NAMES)) == 171
    assert {"happy", "afraid", "calm", "desperate", "loving", "panicked", "at ease"} <= set(emo.NAMES)
    assert all(e.cluster for e in emo.EMOTIONS)


def test_warriner_exact_and_lemma_fallback():
    calm = emo.get("calm")
    assert calm.valence == pytest.approx(6.89) and calm.arousal == pytest.approx(1.67)
    assert emo.get("loving").rated_as == "love"
    assert emo.get("panicked").rated_as == "panic"
    assert emo.get("trapped").rated_as == "trap"
    assert emo.get("loving").valence == pytest.approx(8.00)


def test_unrated_words_are_reported_not_invented():
    missing = emo.unrated()
    assert "exasperated" in missing
    assert all(emo.get(m).valence is None for m in missing)
    report = emo.coverage_report()
    assert "exasperated" in report and "loving->love" in report


def test_unknown_emotion_suggests_close_names():
    with pytest.raises(emo.UnknownEmotionError, match="Did you mean: happy"):
        emo.get("hapy")
    assert emo.resolve(None) == emo.NAMES
    assert emo.resolve(["calm", "afraid"]) == ("calm", "afraid")


def test_null_is_a_word_in_the_norms():
    assert "null" in emo.warriner_norms()
