"""Command-line tools: model_info, benchmark_model, convert_torch."""
