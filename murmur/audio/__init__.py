"""Audio in: decoding any container to 16 kHz mono, log-mel, speech regions (VAD), chunks cut at silences."""
