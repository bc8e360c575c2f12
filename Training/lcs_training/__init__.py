"""Training, synthetic subjects, evaluation and benchmarks for Label Conditioned Segmentation."""
