"""sdvg_export: ONNX export of the four compiled parts and TensorRT engine builds."""
