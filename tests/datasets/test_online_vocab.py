"""Online vocabulary rules: union by synonym tuple, cap at 80, uniform negatives (pool for detection only),
'' padding, label remapping."""
from __future__ import annotations

import numpy as np

from yworld.datasets.online_vocab import MAX_TEXTS, merge_texts, sample_vocabulary, text_key

POOL = [[f"class{i}", f"class{i} alias"] for i in range(365)]


def box_texts(texts, labels):
    return [texts[int(t)] for t in labels]


def test_merge_unions_texts_by_their_whole_synonym_tuple_and_remaps_labels():
    a = [["cat"], ["dog", "puppy"], ["bread"]]
    b = [["dog", "puppy"], ["bird"], ["bread", "bun"]]  # one shared text; "bread, bun" is not "bread"
    union, (la, lb) = merge_texts([a, b], [np.array([1, 0, 1, 2]), np.array([1, 0, 2])])
    assert union == [["cat"], ["dog", "puppy"], ["bread"], ["bird"], ["bread", "bun"]]
    assert text_key(["bread"]) != text_key(["bread", "bun"])
    assert box_texts(union, la) == [["dog", "puppy"], ["cat"], ["dog", "puppy"], ["bread"]]
    assert box_texts(union, lb) == [["bird"], ["dog", "puppy"], ["bread", "bun"]]
    _, (empty,) = merge_texts([[["x"]]], [np.zeros(0, np.int64)])
    assert empty.shape == (0,)


def check_labels_point_at_their_text(vocab, texts, labels):
    """Every kept box's new label names (a synonym of) the text its old label named."""
    for old, new in zip(labels[vocab.keep], vocab.labels):
        assert vocab.texts[new] in texts[old]


def test_detection_fills_to_80_with_pool_negatives_without_duplicates():
    texts = [["person", "human"], ["car"], ["class7"]]  # class7 is also in the pool
    labels = np.array([0, 1, 1])
    rng = np.random.default_rng(0)
    v = sample_vocabulary(texts, labels, "detection", rng, negative_pool=POOL)
    assert len(v.texts) == MAX_TEXTS and v.text_mask.all()
    keys = [t.lower().replace(" alias", "") for t in v.texts]
    assert len(set(keys)) == MAX_TEXTS  # no text twice, even as a different synonym
    assert v.keep.all()
    check_labels_point_at_their_text(v, texts, labels)
    assert "class7" in keys  # the sample's own text without a box is a negative


def test_grounding_and_image_text_get_no_pool_negatives_and_are_padded():
    texts = [["a man in red"], ["a dog"], ["the ball"]]
    labels = np.array([0, 0, 1])
    for kind in ("grounding", "image_text"):
        v = sample_vocabulary(texts, labels, kind, np.random.default_rng(1), negative_pool=POOL)
        assert len(v.texts) == MAX_TEXTS
        assert v.text_mask.sum() == 3  # 2 positives + the caption's boxless phrase, nothing from the pool
        assert sorted(t for t in v.texts if t) == ["a dog", "a man in red", "the ball"]
        assert all(t == "" for t, m in zip(v.texts, v.text_mask) if not m)
        assert all(t != "" for t, m in zip(v.texts, v.text_mask) if m)
        check_labels_point_at_their_text(v, texts, labels)


def test_more_than_80_positives_are_sampled_and_their_boxes_dropped():
    texts = [[f"thing {i}"] for i in range(120)]
    labels = np.repeat(np.arange(120), 2)
    v = sample_vocabulary(texts, labels, "detection", np.random.default_rng(2), negative_pool=POOL)
    assert v.text_mask.sum() == 80
    assert all(t.startswith("thing ") for t in v.texts)  # no room for negatives
    assert v.keep.sum() == 160 and len(v.labels) == 160  # 80 texts x 2 boxes each
    check_labels_point_at_their_text(v, texts, labels)
    kept_texts = {texts[i][0] for i in labels[v.keep]}
    assert kept_texts == set(v.texts)


def test_random_synonym_and_shuffle_vary_with_the_rng():
    texts = [["sofa", "couch"], ["tv"]]
    labels = np.array([0, 1])
    words, first_slots = set(), set()
    for seed in range(30):
        v = sample_vocabulary(texts, labels, "detection", np.random.default_rng(seed), negative_pool=POOL[:5])
        words.add(v.texts[v.labels[0]])
        first_slots.add(int(v.labels[0]))
        check_labels_point_at_their_text(v, texts, labels)
    assert words == {"sofa", "couch"}
    assert len(first_slots) > 3  # the list is shuffled


def test_sample_without_boxes_still_gets_a_vocabulary():
    texts = [["cat"]]
    v = sample_vocabulary(texts, np.zeros(0, np.int64), "detection", np.random.default_rng(0), negative_pool=POOL)
    assert v.text_mask.all() and len(v.labels) == 0
    v = sample_vocabulary(texts, np.zeros(0, np.int64), "grounding", np.random.default_rng(0))
    assert v.texts[0] == "cat" and v.text_mask.sum() == 1


def test_max_texts_is_respected():
    v = sample_vocabulary([["a"], ["b"]], np.array([0]), "detection", np.random.default_rng(0),
                          negative_pool=POOL, max_texts=8)
    assert len(v.texts) == 8 and v.text_mask.all()


def test_classes_sharing_a_first_synonym_are_both_in_the_vocabulary():
    pool = [["bread"], ["bread", "bun"], ["cake"]]
    v = sample_vocabulary([["cake"]], np.array([0]), "detection", np.random.default_rng(0), negative_pool=pool,
                          max_texts=8)
    assert v.text_mask.sum() == 3  # cake (positive) + both breads as negatives


def test_negatives_are_uniform_over_the_non_positive_classes():
    """A class whose boxes a mosaic crop removed is in the merged texts AND in the pool; it must be drawn as
    often as any other non-positive class (official RandomLoadText: random.sample over class indices)."""
    pool = [[f"class{i}"] for i in range(40)]
    texts = [["class0"], ["class1"]]  # class0 keeps a box; class1 was cropped out of the mosaic
    labels = np.array([0])
    rng = np.random.default_rng(0)
    counts = np.zeros(40)
    draws = 3000
    for _ in range(draws):
        v = sample_vocabulary(texts, labels, "detection", rng, negative_pool=pool, max_texts=5)
        for t in v.texts:
            counts[int(t[5:])] += 1
    assert counts[0] == draws  # the positive is always there
    expected = draws * 4 / 39  # 4 negatives out of 39 non-positive classes
    others = counts[2:]
    assert abs(others.mean() - expected) < 0.05 * expected
    assert abs(counts[1] - expected) < 4 * expected ** 0.5  # ~±4 sigma; the old double count gave ~1.9x


def test_negatives_are_drawn_afresh_for_every_sample():
    """One generator, many samples with the same positives (a window of similar images): each sample gets its
    own negatives in its own order; re-seeding per sample, or drawing once per window, gives every sample the
    same list (the one-line bug this guards)."""
    rng = np.random.default_rng(0)
    texts, labels = [["person"], ["car"]], np.array([0, 1, 1])
    vocabularies = [sample_vocabulary(texts, labels, "detection", rng, POOL, 20) for _ in range(50)]
    negatives = [tuple(t for t in v.texts if t not in ("person", "car")) for v in vocabularies]
    assert len(set(negatives)) == 50  # no two samples share their negative list
    assert len({frozenset(n) for n in negatives}) == 50  # nor their negative set
    assert len({v.texts.index("person") for v in vocabularies}) > 5  # the positives move between slots too
    seen = {t.removesuffix(" alias") for n in negatives for t in n}
    assert len(seen) > 250  # 50 x 18 draws over 365 classes reach most of the pool
