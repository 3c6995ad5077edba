"""Live transcription: audio in as it is spoken, committed words out, many streams in one engine."""
