"""Other libraries' formats: open_clip / OpenAI CLIP weights in and out (``weights``, ``weight_files``) and CLIP's
BPE vocabulary as a tokenizer.json (``clip_bpe``)."""
