"""The Whisper model, int8 quantisation, the tokenizer, and loading weights by source format."""
