"""--evaluate and --export: accuracy per class and confusion matrix, ONNX/TorchScript files, cost profiles."""
