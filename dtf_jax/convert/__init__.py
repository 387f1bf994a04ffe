"""Weight conversion from PyTorch state dicts to dtf_jax variables."""

from dtf_jax.convert.official import ConversionError, ConversionReport, \
    convert_official_state_dict, unwrap_state_dict
