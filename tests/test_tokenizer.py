from transformers import CLIPTokenizer

from training.presets import train_clip_tokenizer


def test_tokenizer_round_trip_and_unknown_words(tmp_path):
    from synthetic.world import caption_corpus

    tok = train_clip_tokenizer(caption_corpus(2000), 600, tmp_path / "tok")
    assert (tmp_path / "tok" / "vocab.json").exists() and (tmp_path / "tok" / "merges.txt").exists()
    again = CLIPTokenizer.from_pretrained(tmp_path / "tok")
    for text in ["a red circle on the left", "small blue square, top right, on a white background"]:
        ids = again(text).input_ids
        assert ids[0] == again.bos_token_id and ids[-1] == again.eos_token_id
        assert again.decode(ids, skip_special_tokens=True).replace(" ,", ",") == text
    # frequent words of the corpus are single tokens
    assert len(again("circle").input_ids) == 3
    # a word never seen still tokenizes, as sub-word pieces, with no unknown token
    ids = again("zyzzyva ünïcode 42").input_ids
    assert again.unk_token_id not in ids[1:-1]
    assert again.decode(ids, skip_special_tokens=True) == "zyzzyva ünïcode 4 2"
    assert tok.model_max_length == 77
