"""Supervised fine-tuning of causal LMs (`run_clm.py`): prompt/response data, generation, GSM8K scoring."""
