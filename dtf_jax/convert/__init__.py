"""Weight conversion from PyTorch checkpoints (official DTF, ImageNet ResNet and Swin) to dtf_jax
variables."""

from dtf_jax.convert.imagenet import SOURCES, STEM_INITS, detect_source
from dtf_jax.convert.official import ConversionError, ConversionReport, \
    convert_official_state_dict, convert_state_dict, convert_with_report, map_state_dict
from dtf_jax.convert.state_dict import CheckpointReadError, read_state_dict, unwrap_state_dict
