"""TextStream: incremental detokenization. Whatever the chunks, the deltas add up to decoding all
the ids at once; a stop string cuts the text and the token count exactly; and each push decodes a
short window, not everything so far."""
import random

import pytest

from server.tokenizer import TextStream, Tokenizer


def _save(tok, tmp_path, name) -> Tokenizer:
    path = tmp_path / f"{name}.json"
    tok.save(str(path))
    return Tokenizer(path)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    from tokenizers import Tokenizer as HF, decoders, models, pre_tokenizers

    from server.demo import _bytes_to_unicode

    tmp = tmp_path_factory.mktemp("tok")
    # every byte a token: random ids split multi-byte characters (the decoder gives U+FFFD until
    # the character is complete)
    chars = _bytes_to_unicode()
    merges = [(chars[0xC3], chars[0xA9])]           # one merge: a token that is a whole character
    vocab = {c: i for i, c in enumerate(chars)}
    vocab[chars[0xC3] + chars[0xA9]] = 256
    byte_level = HF(models.BPE(vocab=vocab, merges=merges))
    byte_level.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    byte_level.decoder = decoders.ByteLevel()
    # SentencePiece style: words carry their leading space as "\u2581", which the decoder turns back
    # into a space and drops at the start of a sequence, so a window's first token decodes differently
    words = ["\u2581Hello", "\u2581world", "!", "\u2581a", "b", "\u2581", "\u2581stop", "ping", "\u2581\u00e9t\u00e9", "."]
    sp = HF(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="!"))
    sp.decoder = decoders.Metaspace()
    return {"byte_level": (_save(byte_level, tmp, "byte"), 257), "sentencepiece": (_save(sp, tmp, "sp"), len(words))}


def _stream(tok, ids, chunks, stop=()):
    ts = TextStream(tok, list(stop))
    out, i, count = [], 0, 0
    for k, n in enumerate(chunks):
        piece = ids[i:i + n]
        i += n
        delta, count = ts.push(piece, final=k == len(chunks) - 1 or i >= len(ids))
        out.append(delta)
        if ts.stopped or i >= len(ids):
            break
    return "".join(out), count, ts


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_deltas_add_up_to_decoding_everything_at_once(tokenizers, name):
    tok, vocab = tokenizers[name]
    rng = random.Random(7)
    for trial in range(60):
        ids = [rng.randrange(vocab) for _ in range(rng.randrange(1, 80))]
        chunks = [rng.choice([1, 1, 2, 3, 5]) for _ in range(len(ids))]
        text, count, _ = _stream(tok, ids, chunks)
        assert text == tok.decode(ids), (name, ids)
        assert count == len(ids)


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_a_stop_string_cuts_the_text_and_the_tokens_exactly(tokenizers, name):
    """The text ends before the stop string; the ids that count end with the one that completed
    it, so a message that carried more tokens than that reports only those."""
    tok, vocab = tokenizers[name]
    rng = random.Random(11)
    checked = 0
    for trial in range(200):
        ids = [rng.randrange(vocab) for _ in range(60)]
        full = tok.decode(ids)
        if len(full) < 12:
            continue
        at = rng.randrange(3, len(full) - 3)
        stop = full[at:at + 2]
        if "\ufffd" in stop:
            continue
        text, count, ts = _stream(tok, ids, [rng.choice([1, 2, 4]) for _ in ids], [stop])
        first = full.index(stop)
        assert ts.stopped and text == full[:first], (name, ids, stop)
        assert stop in tok.decode(ids[:count]) and stop not in tok.decode(ids[:count - 1])
        checked += 1
    assert checked > 50


@pytest.mark.parametrize("name", ["byte_level", "sentencepiece"])
def test_of_several_stop_strings_the_first_in_the_text_wins(tokenizers, name):
    """Whatever their order in the request and however the tokens arrive (one by one, or many
    in one push as --stream-interval sends them), the text ends before the earliest stop."""
    tok, vocab = tokenizers[name]
    rng = random.Random(5)
    checked = 0
    for trial in range(1000):
        ids = [rng.randrange(vocab) for _ in range(60)]
        full = tok.decode(ids)
        if len(full) < 20:
            continue
        a, b = sorted(rng.sample(range(2, len(full) - 3), 2))
        early, late = full[a:a + 2], full[b:b + 3]
        if "\ufffd" in early + late or early in late:
            continue
        first = min(full.index(early), full.index(late))
        for chunks in ([1] * len(ids), [len(ids)], [rng.choice([2, 3, 7]) for _ in ids]):
            text, count, ts = _stream(tok, ids, chunks, [late, early])
            assert ts.stopped and text == full[:first], (name, ids, early, late, chunks[:3])
        checked += 1
    assert checked >= 30


def test_each_push_decodes_a_window_not_everything(tokenizers):
    """2000 tokens: the ids decoded in all stay linear in the output (all-so-far was ~2M)."""
    tok, vocab = tokenizers["sentencepiece"]
    decoded = [0]
    real = tok.decode

    def counting(ids):
        decoded[0] += len(ids)
        return real(ids)

    tok.decode = counting
    try:
        ids = [random.Random(3).randrange(vocab) for _ in range(2000)]
        text, _, _ = _stream(tok, ids, [1] * len(ids))
    finally:
        tok.decode = real
    assert text == tok.decode(ids)
    assert decoded[0] < 10 * len(ids), decoded[0]
