"""What serving engines accept of an adapter: the facts `lorpa check`, the model card and the pruned config use."""

VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def vllm_max_lora_rank(rank: int) -> int | None:
    """The smallest value vLLM's --max-lora-rank accepts that holds `rank` (None above its largest)."""
    return next((value for value in VLLM_MAX_LORA_RANKS if value >= rank), None)
