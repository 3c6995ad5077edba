"""Batch jobs over many recordings: locally, or on a Ray cluster (`murmur batch`)."""
