"""What the Trainer scripts (run_image_classification.py, run_semantic_segmentation.py, run_linear_probe.py) share."""
