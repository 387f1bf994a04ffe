"""Command-line tools (python -m dtf_jax.tools.NAME): convert_torch, model_info, benchmark_model,
benchmark_input, predict, visualize, export."""
