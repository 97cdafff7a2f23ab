"""Task families of the run scripts: GLUE, summarization, causal-LM SFT; their data, metrics and generation."""
