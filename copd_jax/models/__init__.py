"""Models: the one Qwen3 decoder, the vision towers (toy and Qwen3-VL), Hugging Face import
and export, and stacked branches (a leading expert axis). Imports nothing else of ours."""
