"""SimCSE and the contrastive trainer (`embedline train`): config, data batching, losses (plain and cached),
checkpoints that resume to the same weights, DDP, and the loop that writes an artifact."""
