"""ONNX export (installed as ``mgr_engine.export``).

Empty so far: exporting the network to ONNX Runtime / TensorRT graphs is the work
of a later issue.
"""
