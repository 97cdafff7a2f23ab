"""LoRPA: Lottery Rank-Pruning Adaptation on top of peft LoRA."""
