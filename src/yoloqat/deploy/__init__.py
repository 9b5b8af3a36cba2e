"""Deployment: YOLOv10's end-to-end head, the INT4 ONNX graph writer and its verification,
onnxruntime sessions and runners, parity and speed, and mAP/COCO scoring of end-to-end rows.

Stage jobs (``yoloqat.pipeline.export`` / ``evaluate``) compose these; nothing here reads
params or writes stage outputs.
"""
