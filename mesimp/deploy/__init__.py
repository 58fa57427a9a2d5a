"""After training: ONNX export (fp32 and int8) and onnxruntime benchmarks."""
