"""The training stage (installed as `embedline.training`), one sub-package per product:

    simcse/       the contrastive trainer: SimCSE (unsupervised and supervised) and the other pair losses
    fewshot/      the few-shot classifier: contrastive body (simcse's trainer), then a small head
    diagnostics/  what an embedding space looks like: measures, named pathologies, 2-D pictures

and what they share: data.py (reading STS, NLI and pair files), labeled_data.py (text/label files),
evaluate.py (embedding texts with any encoder, STS Spearman) and plot.py (figures).
"""
