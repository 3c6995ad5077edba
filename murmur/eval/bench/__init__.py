"""`murmur bench`: benchmark sets from ../shared/data, the peers (faster-whisper), the run, the plot."""
