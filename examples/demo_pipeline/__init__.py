"""The parts of demo.py: its settings, generated data, teacher, script jobs and report."""
