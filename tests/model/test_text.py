"""TextEncoder (tiny random CLIP, real MiniLM), synonyms and the offline Vocabulary."""
from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from yworld.model.errors import DataError, WeightsError
from yworld.model.text import TextEncoder, Vocabulary, pick_texts


def _tiny_clip_tokenizer():
    """A real CLIP BPE tokenizer over a byte-level alphabet (no merges): built offline, no hub files."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for ch in alphabet:
            vocab[ch + suffix] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[]), len(vocab)


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(0)
    tokenizer, vocab_size = _tiny_clip_tokenizer()
    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=2, projection_dim=24, max_position_embeddings=77,
                            bos_token_id=0, eos_token_id=1, pad_token_id=1)
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPTextModelWithProjection(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def minilm():
    return TextEncoder("minilm", device="cpu")


def test_clip_matches_reference_call_and_is_normalised(tiny_clip_dir):
    from transformers import AutoTokenizer, CLIPTextModelWithProjection

    enc = TextEncoder(str(tiny_clip_dir), device="cpu")
    assert (enc.kind, enc.dim) == ("clip", 24)
    texts = ["a dog", "traffic light", "", "a dog"]
    got = enc.encode(texts)
    assert got.shape == (4, 24) and not got.requires_grad
    torch.testing.assert_close(got.norm(dim=-1), torch.ones(4))

    # The reference (YOLO-World's HuggingCLIPLanguageBackbone): tokenizer(padding=True), text_embeds, L2 norm.
    tok = AutoTokenizer.from_pretrained(tiny_clip_dir)
    ref_model = CLIPTextModelWithProjection.from_pretrained(tiny_clip_dir).eval()
    with torch.no_grad():
        ref = F.normalize(ref_model(**tok(texts, padding=True, return_tensors="pt")).text_embeds, dim=-1)
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    # Padding to the longest text must not change a text's embedding (EOS pooling, attention mask).
    torch.testing.assert_close(enc.encode(["a dog"])[0], got[0], atol=1e-5, rtol=0)
    assert not torch.allclose(got[0], got[1])


def test_encoder_is_frozen(tiny_clip_dir):
    enc = TextEncoder(str(tiny_clip_dir), kind="clip", device="cpu")
    assert not enc.model.training
    assert all(not p.requires_grad for p in enc.model.parameters())
    with torch.enable_grad():
        assert not enc.encode(["dog"]).requires_grad


def test_minilm_has_real_semantics(minilm):
    assert (minilm.kind, minilm.dim) == ("sentence", 384)
    dog, puppy, car = minilm.encode(["dog", "puppy", "car"])
    torch.testing.assert_close(torch.stack([dog.norm(), car.norm()]), torch.ones(2))
    assert dog @ puppy > dog @ car + 0.1


def test_encode_batch_dedupes_and_caches(minilm, monkeypatch):
    minilm._cache.clear()
    embedded: list[str] = []
    original = minilm._embed_uncached

    def counting(texts):
        embedded.extend(texts)
        return original(texts)

    monkeypatch.setattr(minilm, "_embed_uncached", counting)
    batch = [["dog", "car", ""], ["car", "dog", ""], ["cat", "", ""]]
    out = minilm.encode_batch(batch)
    assert out.shape == (3, 3, 384)
    assert sorted(embedded) == sorted(["dog", "car", "", "cat"])  # each distinct string encoded once
    torch.testing.assert_close(out[1, 0], out[0, 1])
    minilm.encode_batch(batch)
    assert len(embedded) == 4  # the second step is served from the cache
    torch.testing.assert_close(out[2], original(["cat", "", ""]), atol=1e-5, rtol=0)
    with pytest.raises(Exception, match="same number of texts"):
        minilm.encode_batch([["dog"], ["dog", "car"]])


def test_cache_is_bounded(tiny_clip_dir):
    enc = TextEncoder(str(tiny_clip_dir), device="cpu", cache_size=3)
    first = enc.encode(["a", "b", "c", "d", "e"])
    assert len(enc._cache) == 3
    torch.testing.assert_close(enc.encode(["a"])[0], first[0])


def test_missing_model_id_gives_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(WeightsError) as err:
        TextEncoder("yworld-tests/no-such-text-model", device="cpu")
    message = str(err.value)
    assert "\n" not in message
    assert "yworld-tests/no-such-text-model" in message
    assert "local directory" in message and "HF_HOME" in message
    assert err.value.__cause__ is None and err.value.__suppress_context__
    with pytest.raises(WeightsError, match="does not exist"):
        TextEncoder("/no/such/dir/clip", device="cpu")


def test_pick_texts_random_when_training_first_when_testing():
    classes = [["aerosol can", "spray can"], ["air conditioner"], "apple"]
    assert pick_texts(classes, train=False) == ["aerosol can", "air conditioner", "apple"]
    rng = random.Random(0)
    seen = {pick_texts(classes, train=True, rng=rng)[0] for _ in range(50)}
    assert seen == {"aerosol can", "spray can"}
    gen = np.random.default_rng(0)
    seen = {pick_texts(classes, train=True, rng=gen)[0] for _ in range(50)}
    assert seen == {"aerosol can", "spray can"}
    with pytest.raises(DataError, match="class text 1"):
        pick_texts([["a"], []], train=True)


def test_vocabulary_round_trip_is_exact(minilm, tmp_path):
    texts = ["dog", "traffic light", "", "hot dog"]
    vocab = Vocabulary.from_encoder(minilm, texts)
    written = vocab.save(tmp_path / "sub" / "coco_vocab")
    assert written.endswith(".safetensors") and (tmp_path / "sub" / "coco_vocab.json").exists()
    meta = json.loads((tmp_path / "sub" / "coco_vocab.json").read_text())
    assert meta["encoder"] == "minilm" and meta["dim"] == 384 and meta["texts"] == texts
    for path in (written, tmp_path / "sub" / "coco_vocab.json", tmp_path / "sub" / "coco_vocab"):
        loaded = Vocabulary.load(path)
        assert loaded.texts == texts and loaded.encoder_id == "minilm" and loaded.dim == 384
        assert torch.equal(loaded.embeddings, vocab.embeddings)
    assert torch.equal(loaded.encode_batch([["hot dog", "dog"]])[0, 1], vocab.embeddings[0])
    with pytest.raises(DataError, match="'cat'"):
        loaded.encode(["dog", "cat"])
    with pytest.raises(WeightsError, match="not found"):
        Vocabulary.load(tmp_path / "nothing_here")


def test_official_npy_vocabulary(tmp_path):
    rows = np.random.default_rng(1).normal(size=(3, 512)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    np.save(tmp_path / "coco3.npy", rows)
    (tmp_path / "coco3.json").write_text(json.dumps([["person"], ["bicycle", "bike"], ["car"]]))
    vocab = Vocabulary.load(tmp_path / "coco3.npy", texts_path=tmp_path / "coco3.json")
    assert vocab.texts == ["person", "bicycle", "car"] and vocab.dim == 512
    torch.testing.assert_close(vocab.encode(["car"])[0], torch.from_numpy(rows[2]))
    (tmp_path / "two.txt").write_text("person\nbicycle/bike\n")
    with pytest.raises(DataError, match="2 classes"):
        Vocabulary.load(tmp_path / "coco3.npy", texts_path=tmp_path / "two.txt")
