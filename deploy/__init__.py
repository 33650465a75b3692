"""Deployment: a saved head and its backbone exported as one self-describing ONNX file, and running it."""
