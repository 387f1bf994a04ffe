"""When to call ``jax.distributed.initialize()``: multi-host environments are detected, not assumed.

    cluster = detect_cluster()        # None on a single host, else e.g. 'slurm (4 tasks)'
    initialize(config.distributed)    # main.py: 'auto' initialises only where a cluster is found

Detected (the environments ``jax.distributed.initialize()`` configures itself in):
  - JAX's own variables: ``JAX_COORDINATOR_ADDRESS`` set;
  - SLURM: a job step (``SLURM_JOB_ID``, ``SLURM_STEP_NODELIST``, ``SLURM_PROCID``,
    ``SLURM_LOCALID``) of more than one task (``SLURM_NTASKS``);
  - Open MPI: ``mpirun`` of more than one process (``OMPI_MCA_orte_hnp_uri``,
    ``OMPI_COMM_WORLD_SIZE``);
  - Cloud TPU on GKE: ``TPU_WORKER_HOSTNAMES`` or ``TPU_PROCESS_ADDRESSES`` naming several hosts;
  - Cloud TPU VMs: TPU chips on this machine (``/dev/accel*``, ``/dev/vfio/N``) and the metadata
    server's ``worker-network-endpoints`` listing more than one worker (a pod slice; one query).
A single host (one TPU VM, a GPU machine, a laptop) is never initialised under ``'auto'``.
"""

import glob
import os
import urllib.request
from typing import Mapping, Optional

MODES = ('auto', 'yes', 'no')
_ALIASES = {'true': 'yes', 'false': 'no'}
METADATA_URL = ('http://metadata.google.internal/computeMetadata/v1/instance/attributes/'
                'worker-network-endpoints')


def normalise_mode(value) -> str:
  """``config.distributed.initialize`` -> ``'auto'``, ``'yes'`` or ``'no'`` (``True``/``False``
  and their strings accepted); raises ``ValueError`` for anything else."""
  text = str(value).strip().lower()
  mode = _ALIASES.get(text, text)
  if mode not in MODES:
    raise ValueError(f'{value!r} must be one of {MODES}')
  return mode


def _count(env: Mapping[str, str], key: str) -> int:
  try:
    return int(env.get(key, '1'))
  except ValueError:
    return 1


def _tpu_vm_workers(timeout: float) -> int:
  """Workers of this Cloud TPU VM's slice (0 when this is not a TPU VM or metadata is silent)."""
  if not (glob.glob('/dev/accel*') or glob.glob('/dev/vfio/[0-9]*')):
    return 0
  request = urllib.request.Request(METADATA_URL, headers={'Metadata-Flavor': 'Google'})
  try:
    with urllib.request.urlopen(request, timeout=timeout) as response:
      text = response.read().decode()
  except OSError:
    return 0
  return len([w for w in text.split(',') if w.strip()])


def detect_cluster(env: Optional[Mapping[str, str]] = None, tpu_vm_workers=_tpu_vm_workers,
                   timeout: float = 5.0) -> Optional[str]:
  """A description of the multi-host environment this process runs in, or ``None``."""
  env = os.environ if env is None else env
  if env.get('JAX_COORDINATOR_ADDRESS'):
    return f'JAX_COORDINATOR_ADDRESS={env["JAX_COORDINATOR_ADDRESS"]}'
  slurm = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID', 'SLURM_LOCALID')
  if all(k in env for k in slurm) and _count(env, 'SLURM_NTASKS') > 1:
    return f'slurm ({env["SLURM_NTASKS"]} tasks)'
  if 'OMPI_MCA_orte_hnp_uri' in env and _count(env, 'OMPI_COMM_WORLD_SIZE') > 1:
    return f'open mpi ({env["OMPI_COMM_WORLD_SIZE"]} processes)'
  hosts = env.get('TPU_PROCESS_ADDRESSES') or env.get('TPU_WORKER_HOSTNAMES') or ''
  hosts = [h for h in hosts.split(',') if h.strip()]
  if len(hosts) > 1:
    return f'cloud tpu on gke ({len(hosts)} hosts)'
  workers = tpu_vm_workers(timeout)
  if workers > 1:
    return f'cloud tpu pod slice ({workers} workers)'
  return None


def initialize(distributed, log=print) -> bool:
  """Calls ``jax.distributed.initialize`` as ``distributed`` (the config's ``distributed`` fields)
  asks: ``'yes'``, or ``'auto'`` where :func:`detect_cluster` finds a cluster. Logs the decision;
  returns whether it initialised."""
  mode = normalise_mode(distributed.initialize)
  explicit = bool(distributed.coordinator_address) or distributed.num_processes > 0
  cluster = None
  if mode == 'auto':
    cluster = detect_cluster()
    if cluster is None and explicit:
      cluster = 'coordinator given in the config'
  if mode == 'no' or (mode == 'auto' and cluster is None):
    log(f'distributed: single host (initialize={mode}'
        + (', no multi-host environment detected)' if mode == 'auto' else ')'))
    return False
  import jax  # pylint: disable=import-outside-toplevel
  kwargs = {k: v for k, v, unset in (
      ('coordinator_address', distributed.coordinator_address, ''),
      ('num_processes', distributed.num_processes, 0),
      ('process_id', distributed.process_id, -1)) if v != unset}
  if distributed.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', distributed.cpu_collectives)
  arguments = ', '.join(f'{k}={v!r}' for k, v in kwargs.items())
  log(f'distributed: jax.distributed.initialize({arguments}) [{cluster or "initialize=yes"}]')
  jax.distributed.initialize(**kwargs)
  log(f'distributed: process {jax.process_index()} of {jax.process_count()}, '
      f'{jax.local_device_count()} local / {jax.device_count()} global devices')
  return True
