"""Networks: the model sources chosen by prefix (kd, torchvision, timm:, cifar:, your own), building and weights."""
