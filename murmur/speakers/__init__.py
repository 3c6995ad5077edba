"""Who said what when: word timestamps (alignment heads + DTW), diarization, overlapped-speech segmentation."""
