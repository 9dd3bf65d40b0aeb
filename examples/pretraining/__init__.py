"""What the three pretraining scripts (run_vqkd.py, run_mim.py, run_pixel_decoder.py) share, a module per concern."""
