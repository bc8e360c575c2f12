"""Label Conditioned Segmentation: the compute core (torch, numpy, SimpleITK) and its MRML glue (logic.py)."""
