"""Few-shot classification (`embedline train-classifier`): pairs from labels, the contrastive body (trained
with simcse's trainer) and the logistic-regression head exported as head/head.onnx."""
