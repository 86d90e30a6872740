"""Data for training: readers per on-disk layout, preparation into model space, crops, questions and batches."""
