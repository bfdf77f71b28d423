"""What ships to the robot: numpy, OpenCV, tokenizers, jinja2 and onnxruntime only.

Nothing under this package may import torch or transformers (tests/test_layout.py checks it).
"""
