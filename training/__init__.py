"""Training pipeline of R1Seg3D: data preparation, the four stages on DeepSpeed, and the export to a model folder."""
