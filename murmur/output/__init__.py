"""Results out: one timeline in recording time (stitcher) and the output formats (writers)."""
